"""Crash kernels (`kexec -p`): placement, the crash kernel's decompressor address, writes outside the
reservation, and the crash kernel's /proc/vmcore report.

Expected numbers come from DOMAIN 9.2/9.4 (crashkernel=64M on virt 1 GiB reserved 68000000-6bffffff; kexec
appended elfcorehdr=0x6bf00000 mem=64512K; default placement Kernel 0x68008000 size 0x018e94a8, Initrd
0x698f2000, DT 0x699ca000; --image-size=0x2000000: Initrd 0x6a008000, DT 0x6a0e0000), from kexec-tools
2.0.25's kexec-zImage-arm.c / crashdump-arm.c, Linux 6.1's fdt_check_mem_start.c, kernel_facts.toml, and
from real `kexec --debug -p` runs on virt (tests/unit/data/kexec-2.0.25-crash-*.txt, 2026-12-02), worked by
hand, never from the oracle's output.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from debian_kernel import facts_zimage

from testbench.inputs.crashlog import parse_crash_log
from testbench.inputs.kexeclog import parse_kexec_log
from testbench.kdump_verdict import (
    crash_console,
    kdump_sign_reasons,
    merge_writes,
    observed_outside,
    parse_elf_core,
    parse_vmcore,
    vmcore_problems,
)
from testbench.oracle.crash import (
    CrashRegion,
    crash_kernel_address,
    crash_place,
    crash_region,
    elfcorehdr_address,
    elfcorehdr_align,
    judge_crash,
    outside_writes,
    uses_usable_range,
)

DATA = Path(__file__).parent / "data"
VIRT = ((0x40000000, 0x80000000),)
RESERVED = CrashRegion(0x68000000, 0x6C000000)  # DOMAIN 9.4: crashkernel=64M -> 68000000-6bffffff
DEBIAN_6_1_0_57 = "41ae0a8ffadcdbecce5b129e12f1751e0ccaf42fdf0604ab74c414b95789d481"
DEBIAN_5_10_0_32 = "1e3bde30c9f5537ffcc2e6ae8978231120fa8c9e2f6c85f1477b80745af2e18f"
K61, K510 = "6.1.192-3", "5.10.223-1"


def test_the_crash_kernel_range_is_read_from_iomem():
    text = (DATA / "iomem-virt-1G-crashkernel-64M.txt").read_text()
    assert crash_region(text) == RESERVED
    assert crash_region(text.replace("Crash kernel", "Kernel bss")) is None


# DOMAIN 9.4's initrd was not recorded; its Initrd/DT addresses pin its size to [0xd7000, 0xd8000)
@pytest.mark.parametrize("initrd_size", [0xD7000, 0xD7800, 0xD7FFF])
def test_default_crash_placement_is_domain_9_4(initrd_size):
    placed = crash_place(
        RESERVED, facts_zimage(DEBIAN_6_1_0_57), ">=2.0.17", initrd_size=initrd_size, dtb_size=0x10008F
    )
    pl = placed.placement
    assert (pl.kernel_base, pl.image_size) == (0x68008000, 0x018E94A8)
    assert pl.initrd == (0x698F2000, initrd_size)
    assert pl.dtb is not None and pl.dtb[0] == 0x699CA000
    assert placed.elfcorehdr[0] == 0x6BF00000
    assert placed.cmdline_words == ("elfcorehdr=0x6bf00000", "mem=64512K")
    assert placed.refusals() == ()


def test_image_size_crash_placement_is_domain_9_4():
    placed = crash_place(
        RESERVED,
        facts_zimage(DEBIAN_6_1_0_57),
        ">=2.0.17",
        image_size=0x2000000,
        initrd_size=0xD7800,
        dtb_size=0x10008F,
    )
    assert placed.placement.initrd == (0x6A008000, 0xD7800)
    assert placed.placement.dtb == (0x6A0E0000, 0x10008F)


def test_crash_offsets_are_fixed_not_searched():
    """No locate_hole in crash mode: a region too small for the initrd still gets it at the fixed offset,
    and the load is refused by the kernel (outside crashk_res) or by sort_segments (over the elfcorehdr)."""
    small = CrashRegion(0x68000000, 0x69C00000)  # 28 MiB: the elfcorehdr at 0x69b00000
    placed = crash_place(small, facts_zimage(DEBIAN_6_1_0_57), ">=2.0.17", initrd_size=0x400000, dtb_size=0x10008F)
    assert placed.placement.initrd == (0x698F2000, 0x400000)  # 0x68008000 + ALIGN(0x018e94a8)
    assert placed.elfcorehdr[0] == 0x69B00000
    refusals = " | ".join(placed.refusals())
    assert "initrd segment [0x698f2000, 0x69cf2000) ends outside the crash region" in refusals
    assert "overlaps the elfcorehdr at 0x69b00000" in refusals


def test_elfcorehdr_goes_to_the_top_aligned_down():
    assert elfcorehdr_address(RESERVED, 0x400) == 0x6BF00000
    assert elfcorehdr_address(CrashRegion(0x50000000, 0x54080000), 0x400) == 0x54000000
    assert elfcorehdr_align("2.0.25", elf64=True) == 1 << 20  # 2a3e54e came in 2.0.29
    assert elfcorehdr_align("2.0.29", elf64=True) == 2 << 20
    assert elfcorehdr_align("2.0.29", elf64=False) == 1 << 20


def test_the_decompressor_address_by_kernel_and_loader_version():
    assert uses_usable_range("6.1.0-57-armmp", "2.0.25") is True
    assert uses_usable_range("5.15.0", "2.0.25") is False  # 48342ae751c7 is v5.16
    assert uses_usable_range("6.1.0", "2.0.22") is False  # 5f8d632 (usable-memory-range) is 2.0.23
    to = 0x208000
    # 128 MiB-aligned reservation: both rules agree
    assert crash_kernel_address(RESERVED, 0x68008000, to, VIRT, True, True) == 0x68208000
    assert crash_kernel_address(RESERVED, 0x68008000, to, VIRT, False, True) == 0x68208000
    # 64M@0x4c000000: before 5.16 (PC & 0xF8000000) + TEXT_OFFSET, below the region; after, inside it
    at_4c = CrashRegion(0x4C000000, 0x50000000)
    assert crash_kernel_address(at_4c, 0x4C008000, to, VIRT, False, False) == 0x48208000
    assert crash_kernel_address(at_4c, 0x4C008000, to, VIRT, True, True) == 0x4C208000
    # fdt_check_mem_start: round_up(usable base, SZ_2M)
    odd = CrashRegion(0x50100000, 0x54100000)
    assert crash_kernel_address(odd, 0x50108000, to, VIRT, True, True) == 0x50200000 + to


def _log(name: str):
    text = (DATA / name).read_text()
    return parse_kexec_log(text), parse_crash_log(text)


def test_a_real_kexec_p_log_is_parsed():
    log, crash = _log("kexec-2.0.25-crash-virt-64M-default-6.1.0-57.txt")
    assert crash.crashkernel == (0x68000000, 0x6C000000)
    assert crash.elfcorehdr == (0x6BF00000, 0x400)
    assert crash.appended == {"elfcorehdr": "0x6bf00000", "mem": "64512K"}
    assert crash.coredump_ranges == ((0x40000000, 0x68000000), (0x6C000000, 0x80000000))
    assert crash.reserved_ranges == ((0x68000000, 0x6C000000),)
    assert log.kernel is not None and (log.kernel.address, log.kernel.size) == (0x68008000, 0x018E94A8)
    assert log.initrd is not None and log.initrd.address == 0x698F2000
    assert {s.mem for s in log.segments} >= {0x68008000, 0x698F2000, 0x6BF00000}


def test_default_placement_crash_kernel_clobbers_its_initrd_and_dtb():
    log, crash = _log("kexec-2.0.25-crash-virt-64M-default-6.1.0-57.txt")
    p = judge_crash(
        log, RESERVED, facts_zimage(DEBIAN_6_1_0_57), VIRT, kernel_version=K61, kexec_version="2.0.25",
        elfcorehdr=crash.elfcorehdr,
    )  # fmt: skip
    assert p.kernel_address == 0x68208000
    assert p.verdict == "collision"
    # DOMAIN 2.3 by hand: dest = (0x68208000 + 0x13a12a8 + 0x900) & ~255 = 0x695a9b00, the copy
    # 0x537200 - 0x10a0 rounded to 32 = 0x536160 long, up to 0x69adfc60: over the initrd at 0x698f2000
    copy = [c for c in p.prediction.collisions if c.a == "decompressor.copy" and c.b == "initrd"]
    assert copy and copy[0].start == 0x698F2000
    assert any(c.b == "dtb" and c.severity == "fatal" for c in p.prediction.collisions)
    assert p.outside == ()  # all of it inside the reservation
    assert p.crash_ram == (0x68000000, 0x6BF00000)  # stage 2 said RAM 68000000-6befffff


def test_image_size_crash_kernel_is_safe():
    log, crash = _log("kexec-2.0.25-crash-virt-64M-imagesize-6.1.0-57.txt")
    p = judge_crash(
        log, RESERVED, facts_zimage(DEBIAN_6_1_0_57), VIRT, kernel_version=K61, kexec_version="2.0.25",
        elfcorehdr=crash.elfcorehdr,
    )  # fmt: skip
    assert p.verdict == "safe" and p.findings() == ()


def test_a_pre_5_16_crash_kernel_writes_outside_an_unaligned_reservation():
    """64M@0x4c000000, Debian 5.10: K = 0x48000000 + 0x208000; K + I = 0x495a0fdc <= L + W, so head.S does
    not relocate and the kernel, its bss and its page directory lie below the region."""
    at_4c = CrashRegion(0x4C000000, 0x50000000)
    log, crash = _log("kexec-2.0.25-crash-virt-64M@4c000000-5.10.0-32.txt")
    p = judge_crash(
        log, at_4c, facts_zimage(DEBIAN_5_10_0_32), VIRT, kernel_version=K510, kexec_version="2.0.25",
        elfcorehdr=crash.elfcorehdr,
    )  # fmt: skip
    assert p.kernel_address == 0x48208000
    assert [(w.start, w.end) for w in p.outside] == [(0x48204000, 0x48208000 + 0x1398FDC + 0x532F0)]
    finding = p.outside[0].finding
    assert finding.startswith("decompressor writes [0x48204000, 0x495f42cc) outside the crash region")
    assert finding.endswith("the crashed kernel's memory there is lost to vmcore")
    # mem=64512K counts from PHYS_OFFSET 0x48000000: the initrd at 0x4d878000 is not in the crash kernel's RAM
    assert p.crash_ram == (0x48000000, 0x4BF00000)
    assert p.lost and "initrd [0x4d878000" in p.lost[0]
    assert p.verdict == "collision"


def test_outside_writes_merge_and_name_their_sources():
    written = [("kernel", 0x100, 0x300), ("kernel.bss", 0x300, 0x380), ("decompressor.copy", 0x900, 0xA00)]
    got = outside_writes(written, CrashRegion(0x200, 0x950))
    assert [(w.start, w.end, w.regions) for w in got] == [
        (0x100, 0x200, ("kernel",)),
        (0x950, 0xA00, ("decompressor.copy",)),
    ]


EHDR32 = "<HHIIIIIHHHHHH"  # e_type .. e_shstrndx after the 16-byte e_ident
EHDR64 = "<HHIQQQIHHHHHH"


def _core(loads, cls=1, e_type=4, machine=40):
    """An ELF core header as the kernel's vmcore presents it: one PT_NOTE, then PT_LOADs."""
    phdrs = [(4, 0x1000, 0, 0, 0xB4, 0xB4)] + [(1, 0x2000, 0xC0000000, s, e - s, e - s) for s, e in loads]
    n = len(phdrs)
    if cls == 1:
        head = (
            b"\x7fELF\x01\x01\x01" + bytes(9) + struct.pack(EHDR32, e_type, machine, 1, 0, 52, 0, 0, 52, 32, n, 0, 0, 0)
        )
        return head + b"".join(struct.pack("<IIIIIIII", *p, 7, 0) for p in phdrs)
    head = b"\x7fELF\x02\x01\x01" + bytes(9) + struct.pack(EHDR64, e_type, machine, 1, 0, 64, 0, 0, 64, 56, n, 0, 0, 0)
    return head + b"".join(struct.pack("<IIQQQQQQ", p[0], 7, p[1], p[2], p[3], p[4], p[5], 0) for p in phdrs)


WANT = ((0x40000000, 0x68000000), (0x6C000000, 0x80000000))


@pytest.mark.parametrize("cls", [1, 2])
def test_vmcore_headers_are_read(cls):
    got_cls, problems, loads, truncated = parse_elf_core(_core(WANT, cls))
    assert (got_cls, problems, loads, truncated) == (cls, (), WANT, False)


def test_vmcore_judgement_can_fail():
    def judge(head):
        vm = parse_vmcore(f'TESTBENCH-VMCORE {{"present": true, "size": 1, "head": "{head.hex()}"}}\n')
        return vmcore_problems(vm, VIRT, RESERVED)

    assert judge(_core(WANT)) == []
    assert judge(_core(WANT[:1])) == [
        "/proc/vmcore PT_LOAD ranges leave the old kernel's RAM [0x6c000000, 0x80000000) out"
    ]
    assert "covers [0x68000000, 0x6c000000)" in judge(_core([(0x40000000, 0x80000000)]))[0]
    assert "e_type 2, not ET_CORE" in judge(_core(WANT, e_type=2))[0]
    assert "no ELF magic" in judge(b"\0" * 64)[0]
    assert vmcore_problems(parse_vmcore('TESTBENCH-VMCORE {"present": false}\n'), VIRT, RESERVED)[0].startswith(
        "/proc/vmcore is missing"
    )
    assert vmcore_problems(parse_vmcore("no marker\n"), VIRT, RESERVED) == [
        "the crash kernel's init printed no /proc/vmcore report"
    ]


def test_the_real_crash_kernels_vmcore_line():
    """The crash kernel's init on virt (crashkernel=64M, --image-size=0x2000000): 1,006,641,152 bytes
    (DOMAIN 9.4), PT_LOADs exactly kexec's Coredump memory ranges."""
    vm = parse_vmcore((DATA / "console-kdump-virt-vmcore-line.txt").read_text())
    assert vm is not None and vm.size == 1006641152 and vm.elf_class == 1
    assert vm.loads == WANT
    assert vmcore_problems(vm, VIRT, RESERVED) == []


def test_observed_outside_writes_are_summarised_against_the_oracle():
    runs = [(0x1000, 0x1100), (0x1800, 0x1900), (0x9000, 0x9010)]
    assert merge_writes(runs) == [(0x1000, 0x1900, 0x200), (0x9000, 0x9010, 0x10)]
    lines = observed_outside(runs, [(0x1000, 0x2000)])
    assert lines[0].startswith("emulator: decompressor wrote [0x1000, 0x1900) outside the crash region (1 runs")
    assert "where the oracle predicts no write" in lines[1]


def test_the_crash_kernels_console_starts_at_its_handoff():
    after = "[ 5.75] Kernel panic - not syncing: sysrq triggered crash\n[ 5.76] Loading crashdump kernel...\nBye!\n"
    assert "sysrq" not in crash_console(after)
    line = "[    0.000000] INITRD: 0x4d878000+0x001d9000 is not a memory region - disabling initrd\n"
    assert kdump_sign_reasons(line) == [
        "the crash kernel dropped its initrd (0x4d878000+0x001d9000 is not in its RAM: mem= counts from where it runs)"
    ]


def test_analyze_reads_a_kexec_p_log():
    """`testbench analyze` on a crash log: the kernel version decides the decompressor's address, so without
    it both rules are judged; 5.10 and 6.1 both collide under the default placement of the 0x4c000000 log."""
    from testbench.crash_cli import analyze_crash, is_crash_log

    text = (DATA / "kexec-2.0.25-crash-virt-64M@4c000000-5.10.0-32.txt").read_text()
    assert is_crash_log(text) and not is_crash_log((DATA / "seed_a.txt").read_text())
    old = analyze_crash(text, facts_zimage(DEBIAN_5_10_0_32), "5.10.223", None)
    assert old.verdict == "collision" and old.by_rule[0][1].kernel_address == 0x48208000
    both = analyze_crash(text, facts_zimage(DEBIAN_5_10_0_32), None, None)
    assert [p.kernel_address for _, p in both.by_rule] == [0x4C208000, 0x48208000]
    safe = (DATA / "kexec-2.0.25-crash-virt-64M-imagesize-6.1.0-57.txt").read_text()
    assert analyze_crash(safe, facts_zimage(DEBIAN_6_1_0_57), None, "2.0.25").verdict == "safe"


def test_the_smallest_reservation_for_a_layout():
    """Debian 6.1 in a 128 MiB-aligned reservation: the crash decompressor's footprint ends where kexec -l's
    does relative to the base (the advised --image-size 0x1aea000 puts the initrd at base + 0x1af2000, the
    README's 0x41af2000 on virt); the initrd of 0x1d82f8 and the DTB of 0x10008f after it end at
    base + 0x1dcb08f, so 30 MiB of layout plus the ELF core header's MiB: 31 MiB."""
    from testbench.crash_cli import crash_advise

    a = crash_advise(facts_zimage(DEBIAN_6_1_0_57), VIRT[0], 0x68000000, "2.0.25", K61, 0x1D82F8, 0x10008F)
    assert a.image_size == 0x1AEA000
    assert a.placement.placement.initrd == (0x69AF2000, 0x1D82F8)
    assert a.size == 31 << 20 and a.placement.elfcorehdr[0] == 0x69E00000
    assert a.judged.verdict == "safe"
    # before 5.16, off a 128 MiB boundary, no size helps: the kernel goes below the reservation
    old = crash_advise(facts_zimage(DEBIAN_5_10_0_32), VIRT[0], 0x4C000000, "2.0.25", K510, 0x1D82F8, 0x10008F)
    assert old.judged.outside and old.judged.kernel_address == 0x48208000


def test_a_2_0_20_kexec_p_log_names_the_elfcorehdr_its_own_way():
    """bullseye's 2.0.20 prints "elfcorehdr: 0x6bf00000" and, without --command-line (which it cannot take on
    ARM), gives the crash kernel only its own two words."""
    crash = parse_crash_log((DATA / "kexec-2.0.20-crash-virt-64M-imagesize-6.1.0-57.txt").read_text())
    assert crash.elfcorehdr is not None and crash.elfcorehdr[0] == 0x6BF00000
    assert crash.crashkernel == (0x68000000, 0x6C000000)
    assert crash.command_line == " elfcorehdr=0x6bf00000 mem=64512K"
