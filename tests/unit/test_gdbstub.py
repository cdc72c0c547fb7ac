"""Packet framing against the gdb remote serial protocol spec (gdb manual, "Overview" and "Binary data"),
with expected bytes written out by hand, not produced by the code under test."""

import pytest

from testbench.emulator.gdbstub import GdbError, decode_rle, escape, frame, le_words, parse_packet, unescape


def test_frame_checksum_is_the_byte_sum_mod_256_in_lower_case_hex():
    # 'g' = 0x67; the spec's own example of a read-registers packet is "$g#67".
    assert frame(b"g") == b"$g#67"
    # "OK": 0x4f + 0x4b = 0x9a
    assert frame(b"OK") == b"$OK#9a"
    # "Z1,40008000,4", summed by hand: Z 5a + 1 31 + , 2c + 4 34 + 0 30 x3 + 8 38 + 0 30 x3 + , 2c + 4 34
    # = 0x2a3, so 0xa3 mod 256
    assert frame(b"Z1,40008000,4") == b"$Z1,40008000,4#a3"
    assert frame(b"") == b"$#00"


def test_escape_uses_0x7d_and_xor_0x20_for_the_four_special_bytes():
    assert escape(b"#") == b"}\x03"
    assert escape(b"$") == b"}\x04"
    assert escape(b"}") == b"}]"
    assert escape(b"*") == b"}\x0a"
    assert escape(b"a\x00b") == b"a\x00b"
    for data in (b"#$}*", bytes(range(256))):
        assert unescape(escape(data)) == data


def test_run_length_encoding_repeats_the_previous_char_count_minus_29_times():
    # Spec example: "0* " means "0000" (' ' is 32, so three more).
    assert decode_rle(b"0* ") == b"0000"
    assert decode_rle(b'ab*"c') == b"abbbbbbc"  # '"' = 34 -> 5 more b's


def test_parse_packet_takes_one_packet_and_keeps_the_rest():
    payload, rest = parse_packet(b"+$OK#9a$T05#b9")
    assert payload == b"OK" and rest == b"$T05#b9"
    payload, rest = parse_packet(rest)
    assert payload == b"T05" and rest == b""


def test_parse_packet_waits_for_the_checksum_digits():
    assert parse_packet(b"$OK#9") == (None, b"$OK#9")
    assert parse_packet(b"garbage") == (None, b"")


def test_parse_packet_rejects_a_bad_checksum():
    with pytest.raises(GdbError):
        parse_packet(b"$OK#00")


def test_registers_are_little_endian_words():
    assert le_words("00800040ffffffff", 2) == [0x40008000, 0xFFFFFFFF]
