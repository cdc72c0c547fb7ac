"""Hypothesis properties: advised placements never collide; parsers only raise their own errors."""

from __future__ import annotations

import contextlib
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zimage_builder import DATA, build_zimage

from testbench.kexeclog import KexecLogError, parse_kexec_log
from testbench.oracle import AdviceError, advise, predict
from testbench.zimage import ZImageError, parse_zimage

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
@given(raw=zimages, base=st.sampled_from([0x0, 0x10000000, 0x40000000, 0x60000000, 0x80000000]),
       ram=st.sampled_from([256 * MiB, 512 * MiB, 1024 * MiB]),
       initrd=st.one_of(st.none(), st.integers(1, 100 * MiB)),
       dtb=st.one_of(st.none(), st.integers(0x1000, MiB)),
       version=st.sampled_from(["2.0.12", "2.0.14", "2.0.16", "2.0.18", "2.0.25"]))
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
def test_random_text_only_raises_kexec_log_error(text):
    with contextlib.suppress(KexecLogError):
        parse_kexec_log(text)


SEED = (DATA / "seed_a.txt").read_text()


@settings(max_examples=300, deadline=None)
@given(cut=st.integers(0, len(SEED)), noise=st.text(max_size=40), at=st.integers(0, len(SEED)))
def test_truncated_or_noisy_seed_only_raises_kexec_log_error(cut, noise, at):
    text = SEED[:cut]
    text = text[:at] + noise + text[at:]
    with contextlib.suppress(KexecLogError):
        parse_kexec_log(text)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=0x400))
def test_random_bytes_only_raise_zimage_error(raw):
    with contextlib.suppress(ZImageError):
        parse_zimage(raw)


HEADER = build_zimage(z=0x4000)


@settings(max_examples=300, deadline=None)
@given(cut=st.integers(0, len(HEADER)), pos=st.integers(0, 0x400), word=st.integers(0, 0xFFFFFFFF))
def test_truncated_or_corrupted_zimage_only_raises_zimage_error(cut, pos, word):
    raw = bytearray(HEADER[:cut])
    if pos + 4 <= len(raw):
        struct.pack_into("<I", raw, pos, word)
    with contextlib.suppress(ZImageError):
        parse_zimage(bytes(raw))
