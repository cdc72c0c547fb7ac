"""kexec --debug log parser, on the seed logs (numbers as printed there) and on synthetic old formats."""

from __future__ import annotations

import pytest

from testbench.inputs.kexeclog import KexecLogError, Placed, parse_kexec_log, parse_kexec_logs


def test_seed_a_corentin_2_0_18(seed_text):
    log = parse_kexec_log(seed_text("seed_a"))
    assert log.format == ">=2.0.17"
    assert log.memory_ranges == ((0x20000000, 0xA0000000),)
    assert log.header == (0x016F2818, 0, 0x443AC0)
    assert (log.zimage_size, log.file_size) == (0x443AC0, 0x443AC0)
    assert log.zimage_requires == 0x454AC0
    assert (log.tag_offset, log.tag_size) == (0x6678, 8)
    assert (log.text_data, log.bss, log.total) == (0xB78080, 0x3D3C0, 0xBB5440)
    assert log.kernel_space == 0xFCCB40
    assert log.kernel == Placed(0x20008000, 0xFCCB40)
    assert log.initrd == Placed(0x20FD5000, 0x167213D)
    assert log.dtb == Placed(0x22648000, 0x6043)
    assert log.entry == 0x20008000
    assert [(s.mem, s.memsz) for s in log.segments] == [
        (0x20008000, 0x444000),
        (0x20FD5000, 0x1673000),
        (0x22648000, 0x7000),
    ]
    # "segment[2].mem = 0x2[ 31.265096] sun7i-dwmac ... Link is Down" + "2648000"
    assert log.segments[2].mem == 0x22648000
    c = log.decompressor_copy
    assert (c.src_start, c.src_end, c.dst_start, c.dst_end) == (0x200080C0, 0x2044BAC0, 0x20B80B00, 0x20FC4500)


def test_seed_b_hummingboard_2_0_20(seed_text):
    log = parse_kexec_log(seed_text("seed_b"))
    assert log.memory_ranges == ((0x10000000, 0x50000000),)
    assert (log.tag_offset, log.tag_size) == (0x4DA8, 12)
    assert log.total == 0x15077B0
    assert log.kernel_space == 0x15077B0
    assert log.initrd == Placed(0x11510000, 0x53F46A)
    assert log.dtb == Placed(0x11A50000, 0xB044)
    assert log.decompressor_copy is None
    assert len(log.segments) == 3


def test_console_lines_cut_through_segment_lines(seed_text):
    log = parse_kexec_log(seed_text("seed_a80_first"))
    # "segm[ 71.039126] kexec_core: ..." / "ent[2].mem = 0[ 71.044712] ..." / "x22704000"
    assert log.segments[2].mem == 0x22704000
    assert log.segments[2].memsz == 0x6000
    assert log.dtb == Placed(0x22704000, 0x5C09)


def test_retried_kexec_load_takes_last_segment_set(seed_text):
    log = parse_kexec_log(seed_text("seed_virt_retry"))
    assert log.kexec_version == "2.0.20"
    assert [s.buf for s in log.segments] == [0xB6AA0008, 0xB699F008]
    assert log.dtb == Placed(0x41051000, 0x100000)
    assert log.initrd is None


def test_whole_thread_gives_every_run_and_the_last(seed_text):
    text = "\n".join(seed_text(n) for n in ("seed_a80_first", "seed_virt_retry", "seed_b", "seed_a"))
    logs = parse_kexec_logs(text)
    assert len(logs) == 4
    assert parse_kexec_log(text).initrd == Placed(0x20FD5000, 0x167213D)


OLD_2_0_12 = """\
MEMORY RANGES
0000000060000000-000000006fffffff (0)
kexec_load: entry = 0x60008000 flags = 0x280000
nr_segments = 2
segment[0].buf   = 0x76b1d008
segment[0].bufsz = 0x3a1f00
segment[0].mem   = 0x60008000
segment[0].memsz = 0x3a2000
segment[1].buf   = 0x1f3c0
segment[1].bufsz = 0x3b7c
segment[1].mem   = 0x60e91000
segment[1].memsz = 0x4000
"""


def test_old_format_has_no_sizes():
    log = parse_kexec_log(OLD_2_0_12)
    assert log.format == "<=2.0.12"
    assert log.zimage_size is None and log.text_data is None and log.kernel is None
    assert log.entry == 0x60008000
    assert log.segments[1].mem == 0x60E91000


def test_2_0_16_format():
    text = (
        "zImage header: 0x016f2818 0x00000000 0x00407358\nzImage size 0x407358, file size 0x407358\n"
        "zImage has tags\n  offset 0x00007178 tag 0x5a534c4b size 8\nkernel image size: 0x00c60710\n"
    )
    log = parse_kexec_log(text)
    assert log.format == "2.0.16"
    assert log.kernel_image_size == 0xC60710
    assert log.tag_size == 8


def test_incomplete_segments_stay_none():
    log = parse_kexec_log(
        "kexec_load: entry = 0x40008000 flags = 0x0\nnr_segments = 2\n"
        "segment[0].buf = 0x1\nsegment[0].bufsz = 0x2\nsegment[0].mem = 0x40008000\n"
    )
    assert log.segments[0].memsz is None
    assert log.segments[1].mem is None


@pytest.mark.parametrize("text", ["", "hello\nworld\n", "[    1.000] Booting Linux"])
def test_no_kexec_output(text):
    with pytest.raises(KexecLogError):
        parse_kexec_log(text)


def test_to_dict_is_json(seed_text):
    import json

    d = parse_kexec_log(seed_text("seed_a")).to_dict()
    assert json.loads(json.dumps(d))["initrd"] == {"address": 0x20FD5000, "size": 0x167213D}
