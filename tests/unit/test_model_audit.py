"""The model fixes from the 2026-12-01 audit (DOMAIN.md 9.2, 9.3), each against the number or source line
it comes from: head.S of Linux 6.1 (arch/arm/boot/compressed/head.S), fdt_check_mem_start (0673cb389512,
v5.12), kexec-tools' locate_hole (kexec/kexec.c), 20fea93/74c7c36 (the 2.0.17-2.0.20 option clash) and
9817ec8 (the 2.0.17-2.0.21 appended-DTB magic copy)."""

from __future__ import annotations

import pytest
from zimage_builder import build_zimage

from testbench.inputs.kexeclog import parse_kexec_log
from testbench.inputs.zimage import ZImage, parse_zimage, read_zimage
from testbench.oracle import analyze, predict
from testbench.oracle.footprint import Decomp, footprint, has_fallback, kernel_address
from testbench.oracle.placement import PlacementError, place
from testbench.oracle.predict import BOGUS_DTB, FALLBACK_DIM

MiB = 1 << 20


@pytest.fixture
def debian_zimage_parsed(debian_zimage) -> ZImage:
    return read_zimage(debian_zimage)


def _region(written, name):
    return next(((s, e) for n, s, e in written if n == name), None)


# --- appended DTB: r9 += _kernel_bss_size - (_edata - wont_overwrite) (head.S 6.1:428-432) -----------------


def test_appended_dtb_copy_destination_domain_9_3_example():
    """DOMAIN 9.3: Z 0x7273a8, I 0xdbedb8, B 0x7489f8, D8 0x8000: the copy starts at 0x10de9100, not at
    0x10de0f00 as with bss - (Z + D8 - restart). The example's kernel (TEXT_OFFSET 0x8000, RAM at 0x10000000,
    loaded by kexec at base + 0x8000) is a non-EFI build: restart 0xc0, wont_overwrite 0x2c0 (W - R = 0x200,
    the 0x8200 of the example minus D8), relocation pad 0xb00."""
    z, inflated, kbss, d8 = 0x7273A8, 0xDBEDB8, 0x7489F8, 0x8000
    load = kaddr = 0x10008000
    d = Decomp(z, 0xC0, 0xB00, z, z + 0x400, z + 0x1400, dtb8=d8, wont_overwrite=0x2C0)
    copy = _region(footprint(load, kaddr, inflated, kbss, d), "decompressor.copy")
    assert copy is not None and copy[0] == 0x10DE9100


def test_appended_dtb_adjustment_is_zero_when_the_code_above_wont_overwrite_covers_the_bss():
    """Debian 6.1.0-57 with a DTB appended: _edata - wont_overwrite = 0x537200 - 0x1228 is far above the
    kernel's bss 0x5e360, so r9 stays the inflated size and the copy goes to (K + I + P) & ~255."""
    z, inflated, kbss = 0x537200, 0x13A12A8, 0x5E360
    d = Decomp(z, 0x10B4, 0x900, z, 0x537618, 0x538618, dtb8=0x2000, wont_overwrite=0x1228)
    copy = _region(footprint(0x40008000, 0x40208000, inflated, kbss, d), "decompressor.copy")
    assert copy is not None and copy[0] == (0x40208000 + inflated + 0x900) & ~255


# --- "will I overwrite myself": r4 + r9 <= wont_overwrite (head.S 6.1:454-456) ------------------------------


def test_no_relocation_when_the_kernel_ends_below_wont_overwrite():
    """`add r10, r4, r9; adr r9, wont_overwrite; cmp r10, r9; bls wont_overwrite`: a kernel ending between
    restart and wont_overwrite (0x174 bytes on Debian 6.1) is decompressed in place, no copy."""
    load, kaddr, restart, wont = 0x40800000, 0x40008000, 0x10B4, 0x1228
    d = Decomp(0x537200, restart, 0x900, 0x537200, 0x537618, 0x538618, wont_overwrite=wont)
    ends_between = load + restart + 0x100 - kaddr
    assert _region(footprint(load, kaddr, ends_between, 0x5E360, d), "decompressor.copy") is None
    ends_above = load + wont + 4 - kaddr
    assert _region(footprint(load, kaddr, ends_above, 0x5E360, d), "decompressor.copy") is not None


def test_wont_overwrite_scanned_from_the_binary():
    raw = build_zimage(z=0x20000, restart=0x10B4, wont_overwrite=0x1228)
    assert parse_zimage(raw).wont_overwrite == 0x1228
    assert parse_zimage(build_zimage(z=0x20000)).wont_overwrite is None


# --- kernel_address: the fallback is v5.12+ and reads /memory, not /proc/iomem ------------------------------


def test_kernel_address_before_and_since_5_12():
    """DOMAIN 9.3: before 5.12, RAM at 0x0C000000 gives K = 0x08008000 (outside RAM); since 0673cb389512 the
    lowest /memory base rounded up to 2 MiB: 0x0C000000 + TEXT_OFFSET."""
    memory = [(0x0C000000, 0x4C000000)]
    assert kernel_address(0x0C008000, 0x8000, memory, fallback=False) == 0x08008000
    assert kernel_address(0x0C008000, 0x8000, memory, fallback=True) == 0x0C008000
    assert kernel_address(0x0C108000, 0x8000, [(0x0C100000, 0x4C000000)]) == 0x0C208000  # rounded up to 2 MiB


@pytest.mark.parametrize(
    ("version", "expected"),
    [("5.10.223-1", False), ("5.11.22", False), ("5.12.0", True), ("6.1.0-57-armmp", True), ("7.2.13", True)],
)
def test_fallback_by_kernel_version(version, expected):
    assert has_fallback(version) is expected


def test_nomap_region_moves_iomem_not_the_kernel(debian_zimage_parsed):
    """A no-map region at the start of RAM takes it out of iomem's System RAM but not out of /memory: the
    decompressor keeps K = base + TEXT_OFFSET. With iomem alone the model would move K to 0x42000000 + TO."""
    log = parse_kexec_log(_log(ram="42000000-7fffffff", kernel=0x42008000, initrd=0x438F2000, dt=0x439F3000))
    pred = analyze(log, debian_zimage_parsed, memory=[(0x40000000, 0x80000000)], kernel_version="6.1.0-57")
    kernel = next(r for r in pred.regions if r.name == "kernel")
    assert kernel.start == 0x40208000


def test_unknown_kernel_version_off_a_128m_boundary_names_the_fallback(debian_zimage_parsed):
    """RAM at 0x4C000000 (not 128 MiB aligned): K is 0x48208000 (outside RAM) before 5.12 and 0x4C208000
    since; without the version the oracle says which input decides."""
    log = parse_kexec_log(_log(ram="4c000000-8bffffff", kernel=0x4C008000, initrd=0x4D8F2000, dt=0x4D9F3000))
    unknown = analyze(log, debian_zimage_parsed)
    assert any(FALLBACK_DIM in u for u in unknown.undecided) or unknown.verdict != "unknown"
    old = analyze(log, debian_zimage_parsed, kernel_version="5.10.0-32-armmp")
    assert any(c.b == "outside RAM" and c.severity == "fatal" for c in old.collisions)
    new = analyze(log, debian_zimage_parsed, kernel_version="6.1.0-57-armmp")
    assert not any(c.b == "outside RAM" for c in new.collisions)
    assert next(r for r in new.regions if r.name == "kernel").start == 0x4C208000


# --- --mem-min / --mem-max bound every locate_hole (kexec.c) ------------------------------------------------


def test_mem_min_moves_the_kernel_domain_9_2():
    """DOMAIN 9.2: --mem-min=0x30000000 on RAM from 0x20000000 puts the kernel at 0x30008000."""
    pl = place(
        [(0x20000000, 0xA0000000)],
        ">=2.0.17",
        0x853200,
        0x853200,
        0x158B3A0,
        0x632F0,
        None,
        0x90B6FA,
        0x5C09,
        mem_min=0x30000000,
    )
    assert pl.kernel_base == 0x30008000
    assert pl.initrd is not None and pl.initrd[0] > 0x30008000


def test_mem_max_too_low_is_kexecs_own_refusal():
    with pytest.raises(PlacementError, match="mem-max"):
        place(
            [(0x20000000, 0xA0000000)],
            ">=2.0.17",
            0x853200,
            0x853200,
            0x158B3A0,
            0x632F0,
            None,
            0x90B6FA,
            0x5C09,
            mem_max=0x21000000,
        )


# --- kexec-tools 2.0.17-2.0.20: -a is both --append and --kexec-syscall-auto --------------------------------


@pytest.mark.parametrize(
    ("version", "clash"),
    [("2.0.16", False), ("2.0.17", True), ("1:2.0.20-2.1", True), ("2.0.21", False), ("2.0.25", False)],
)
def test_option_clash_named(debian_zimage_parsed, version, clash):
    ram = [(0x40000000, 0x80000000)]
    if clash:
        with pytest.raises(PlacementError, match=r"2\.0\.21"):
            predict(debian_zimage_parsed, ram, version, initrd_size=MiB, dtb_size=MiB, command_line=True)
    else:
        predict(debian_zimage_parsed, ram, version, initrd_size=MiB, dtb_size=MiB, command_line=True)
    predict(debian_zimage_parsed, ram, version, initrd_size=MiB, dtb_size=MiB)  # no command line: fine


# --- kexec-tools 2.0.17-2.0.21 copy the appended DTB's magic (fixed by 9817ec8 in 2.0.22) ------------------


@pytest.mark.parametrize(
    ("version", "bogus"), [("2.0.16", False), ("2.0.17", True), ("2.0.21", True), ("2.0.22", False), ("2.0.25", False)]
)
def test_appended_dtb_magic_copy(version, bogus):
    zi = parse_zimage(build_zimage(z=0x200000, inflated=0x600000, appended_dtb=0x3000, wont_overwrite=0x1228))
    pred = predict(zi, [(0x40000000, 0x60000000)], version, image_size=0x1000000, initrd_size=MiB, dtb_size=0x3000)
    found = [c for c in pred.collisions if c.a == BOGUS_DTB]
    assert bool(found) is bogus
    if bogus:
        assert pred.verdict == "collision" and found[0].severity == "fatal"
        assert found[0].start == pred.placement.kernel_base + zi.size


def _log(ram: str, kernel: int, initrd: int, dt: int) -> str:
    """A 2.0.25 `kexec --debug` log in the shape of DOMAIN 8.3's (Debian 6.1.0-57 on 1 GiB), moved."""
    return f"""MEMORY RANGES
{ram.split("-")[0].rjust(16, "0")}-{ram.split("-")[1].rjust(16, "0")} (0)
zImage header: 0x016f2818 0x00000000 0x00537200
zImage size 0x537200, file size 0x537200
zImage requires 0x00548200 bytes
offset 0x0000d4f0 tag 0x5a534c4b size 24
Decompressed kernel sizes:
 text+data 0x013a12a8 bss 0x0005e360 total 0x013ff608
Resulting kernel space: 0x018e94a8
Kernel: address={kernel:#010x} size=0x018e94a8
Initrd: address={initrd:#010x} size=0x00100000
DT    : address={dt:#010x} size=0x00100000
kexec_load: entry = {kernel:#x} flags = 0x280000
"""
