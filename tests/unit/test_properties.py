"""Hypothesis properties: advised placements never collide; parsers refuse what is not theirs with their own
errors, and accept console noise without changing what they read."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from zimage_builder import DATA, build_zimage

from testbench.inputs.kexeclog import KexecLogError, parse_kexec_log
from testbench.inputs.zimage import ZImageError, parse_zimage
from testbench.oracle import AdviceError, advise, predict

MiB = 1 << 20

zimages = st.builds(
    build_zimage,
    z=st.integers(0x2000, 0x40000).map(lambda x: x & ~3),
    inflated=st.integers(0x10000, 0x3000000),
    kbss=st.integers(0, 0x1000000),
    text_offset=st.sampled_from([0x8000, 0x108000, 0x208000]),
    efi=st.booleans(),
    restart=st.integers(0x40, 0x1100).map(lambda x: x & ~3),
    pad=st.integers(8, 12).map(lambda x: x << 8),
    dbss=st.integers(0, 0x1000),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    raw=zimages,
    base=st.sampled_from([0x0, 0x10000000, 0x40000000, 0x60000000, 0x80000000]),
    ram=st.sampled_from([256 * MiB, 512 * MiB, 1024 * MiB]),
    initrd=st.one_of(st.none(), st.integers(1, 100 * MiB)),
    dtb=st.one_of(st.none(), st.integers(0x1000, MiB)),
    version=st.sampled_from(["2.0.12", "2.0.14", "2.0.16", "2.0.18", "2.0.25"]),
)
def test_advised_image_size_never_collides(raw, base, ram, initrd, dtb, version):
    zi = parse_zimage(raw)
    ranges = [(base, base + ram)]
    try:
        a = advise(zi, ranges, version, initrd, dtb)
    except AdviceError:
        return  # kexec cannot place it at all in this RAM: nothing to advise
    pred = predict(zi, ranges, version, a.image_size, initrd, dtb)
    assert pred.collisions == ()
    assert pred.verdict == "safe"
    if a.needed:  # and any value that rounds up to the same page
        assert predict(zi, ranges, version, a.minimum, initrd, dtb).collisions == ()


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_random_text_is_refused_with_kexec_log_error(text):
    # Every line kexec --debug prints that the reader takes carries a hex number ("0x...") or the MEMORY
    # RANGES heading; text without either is no kexec log, and a reader that accepted it would be wrong.
    assume("0x" not in text.lower() and "memory" not in text.lower())
    with pytest.raises(KexecLogError):
        parse_kexec_log(text)


SEED = (DATA / "seed_a.txt").read_text()
SEED_LINES = SEED.splitlines(keepends=True)


@settings(max_examples=300, deadline=None)
@given(cut=st.integers(0, len(SEED)), noise=st.text(max_size=40), at=st.integers(0, len(SEED)))
def test_truncated_or_noisy_seed_only_raises_kexec_log_error(cut, noise, at):
    text = SEED[:cut]
    text = text[:at] + noise + text[at:]
    with contextlib.suppress(KexecLogError):
        parse_kexec_log(text)


@settings(max_examples=200, deadline=None)
@given(
    noise=st.lists(st.text(alphabet=st.characters(blacklist_characters="\r\n"), max_size=60), max_size=4),
    at=st.integers(0, len(SEED_LINES)),
)
def test_console_lines_between_kexec_lines_change_nothing(noise, at):
    # Board reports interleave kernel console lines with kexec's; lines without a hex number or a MEMORY
    # RANGES heading must leave the parsed plan exactly as the clean log's.
    assume(all("0x" not in n.lower() and "memory" not in n.lower() for n in noise))
    # Not inside the value the seed itself splits with a console line ("mem = 0x2[ 31.26...] ..." then
    # "2648000"): the reader joins that continuation to the line before it.
    assume(at == 0 or "[" not in SEED_LINES[at - 1])
    noisy = "".join(SEED_LINES[:at]) + "".join(f"{n}\n" for n in noise) + "".join(SEED_LINES[at:])
    assert parse_kexec_log(noisy) == parse_kexec_log(SEED)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=0x400))
def test_random_bytes_are_refused_with_zimage_error(raw):
    # Without the zImage magic at 0x24 (and no gzip/uImage wrapper), nothing is a zImage.
    assume(
        raw[0x24:0x28] != struct.pack("<I", 0x016F2818)
        and raw[:2] != b"\x1f\x8b"
        and raw[:4] != bytes.fromhex("27051956")
    )
    with pytest.raises(ZImageError):
        parse_zimage(raw)


HEADER = build_zimage(z=0x4000)


@settings(max_examples=300, deadline=None)
@given(cut=st.integers(0, len(HEADER)), pos=st.integers(0, 0x400), word=st.integers(0, 0xFFFFFFFF))
def test_truncated_or_corrupted_zimage_only_raises_zimage_error(cut, pos, word):
    raw = bytearray(HEADER[:cut])
    if pos + 4 <= len(raw):
        struct.pack_into("<I", raw, pos, word)
    try:
        z = parse_zimage(bytes(raw))
    except ZImageError:
        return
    # Accepted: then it was whole (a cut file is shorter than its header's size) and what was read lies in it.
    assert cut == len(HEADER)
    assert z.size <= len(raw)
