"""kdump on virt (DOMAIN 9.4): stage 1 boots with crashkernel=, `kexec -p` loads the crash kernel, sysrq c
panics stage 1. Expected values are DOMAIN 9.4's (reserved 68000000-6bffffff, elfcorehdr=0x6bf00000
mem=64512K, crash kernel RAM 68000000-6befffff, /proc/vmcore of 1,006,641,152 bytes) and kexec-tools /
head.S arithmetic worked by hand (tests/unit/test_crash_oracle.py), never the bench's own output."""

import pytest

from testbench.inputs.images import load_images
from testbench.inputs.zimage import read_zimage

KDUMP = {"mode": "kdump", "crashkernel": "64M"}
OLD_RAM = [[0x40000000, 0x68000000], [0x6C000000, 0x80000000]]  # virt 1 GiB minus the reservation


def test_crash_kernel_with_room_reaches_init_with_payload_dtb_and_vmcore(run_kexec_case):
    result = run_kexec_case("virt", kexec_args=("--image-size=0x2000000",), **KDUMP)
    assert result.verdict.verdict == "pass", result.verdict.reasons
    kdump = result.kdump
    assert kdump is not None and kdump["region"] == [0x68000000, 0x6C000000]
    words = result.stage2["cmdline"].split()
    assert words[-2:] == ["elfcorehdr=0x6bf00000", "mem=64512K"]
    assert {"maxcpus=1", "reset_devices"} <= set(words)
    assert result.stage2["iomem_ram"] == ["68000000-6befffff"]
    assert kdump["vmcore"]["present"] and kdump["vmcore"]["size"] == 1006641152
    assert kdump["vmcore"]["pt_load"] == OLD_RAM
    assert kdump["outside_writes_observed"] == []
    assert result.observed["stops"][1]["pc"] == 0x68208000  # round_up(0x68000000, 2M) + TEXT_OFFSET
    assert result.oracle["agrees"], result.oracle


def test_default_placement_crash_kernel_dies_with_its_initrd_and_dtb_overwritten(run_kexec_case):
    result = run_kexec_case("virt", **KDUMP)
    assert result.load["kernel"] == {"address": 0x68008000, "size": 0x018E94A8}
    assert result.load["initrd"]["address"] == 0x698F2000
    assert (result.verdict.verdict, result.verdict.phase) == ("fail", "kernel"), result.verdict.reasons
    assert {c["segment"] for c in result.observed["clobbered"]} == {"initrd", "dtb"}
    # the relocated decompressor's copy starts at (0x68208000 + 0x13a12a8 + 0x900) & ~255 = 0x695a9b00,
    # below the initrd: its first byte is the first clobbered one
    assert min(c["start"] for c in result.observed["clobbered"]) == 0x698F2000
    assert result.kdump["oracle"]["verdict"] == "collision"
    assert result.oracle["agrees"], result.oracle


@pytest.fixture(scope="module")
def bullseye():
    return load_images("bullseye")


def test_a_5_10_crash_kernel_writes_below_an_unaligned_reservation(run_kexec_case, bullseye):
    """64M@0x4c000000: a kernel before 5.16 ignores linux,usable-memory-range and decompresses to
    (0x4c008000 & 0xF8000000) + 0x208000 = 0x48208000, over the crashed kernel's memory."""
    result = run_kexec_case(
        "virt", kernel=bullseye.zimage, kernel_suite="bullseye", mode="kdump", crashkernel="64M@0x4c000000"
    )
    assert result.kdump["region"] == [0x4C000000, 0x50000000]
    assert result.observed["stops"][1]["pc"] == 0x48208000
    seen = result.kdump["outside_writes_observed"]
    assert seen and seen[0][0] == 0x48204000  # the page directory at (K - 16K) & ~0x3fff
    assert max(e for _, e in seen) <= 0x48208000 + 0x1398FDC  # the inflated 5.10 kernel's end
    assert result.verdict.verdict == "fail"
    reasons = " | ".join(result.verdict.reasons)
    assert "outside the crash region" in reasons and "lost to vmcore" in reasons
    assert "dropped its initrd" in reasons  # mem=64512K counts from 0x48000000
    assert result.oracle["agrees"], result.oracle


def test_a_6_1_crash_kernel_stays_inside_the_same_reservation(run_kexec_case):
    result = run_kexec_case("virt", kexec_args=("--image-size=0x2000000",), mode="kdump", crashkernel="64M@0x4c000000")
    assert result.observed["stops"][1]["pc"] == 0x4C208000  # round_up(0x4c000000, 2M) + TEXT_OFFSET
    assert result.verdict.verdict == "pass", result.verdict.reasons
    assert result.kdump["outside_writes_observed"] == []


def test_a_reservation_stage_1_cannot_make_is_a_boot1_failure(run_kexec_case):
    """QEMU puts stage 1's initrd at RAM base + 128 MiB (DOMAIN 9.4): the kernel cannot reserve there."""
    result = run_kexec_case("virt", mode="kdump", crashkernel="64M@0x48000000")
    assert (result.verdict.verdict, result.verdict.phase) == ("fail", "boot1")
    assert "crashkernel reservation failed - memory is in use" in " ".join(result.verdict.reasons)


def test_bullseyes_loader_gives_the_crash_kernel_only_its_own_words(run_kexec_case, bullseye):
    """kexec-tools 2.0.20 cannot take --command-line on ARM (DOMAIN 9.2); its crash path then writes
    /chosen/bootargs = " elfcorehdr=... mem=..." over the bench's command line in the DTB."""
    result = run_kexec_case("virt", kexec_suite="bullseye", kexec_args=("--image-size=0x2000000",), **KDUMP)
    assert result.verdict.verdict == "fail"
    assert result.stage2["cmdline"].split() == ["elfcorehdr=0x6bf00000", "mem=64512K"]
    assert any("kexec-tools 2.0.17-2.0.20 take no --command-line" in r for r in result.verdict.reasons)


def test_advised_crashkernel_size_is_the_smallest_that_reaches_init(images, run_kexec_case):
    """advise --crash with the crash kernel's memory (oracle/crash_memory.py, the boot allocations measured
    with a 1 MiB payload) for an 8 MiB payload, a size it was not fitted to: QEMU must reach init at the
    advised size and fail 1 MiB below it (out of memory: the layout alone would take 46 MiB less)."""
    from testbench.crash_cli import crash_advise
    from testbench.crash_measure import crash_runtime
    from testbench.inputs.initramfs import cached_stage2_initrd

    initrd = cached_stage2_initrd(images, 8 << 20, 1).path
    runtime = crash_runtime("debian", images.zimage, "virt", initrd, None, None)
    assert runtime.boot is not None, "data/crash-memory.toml has no measurement for this zImage on virt"
    zi = read_zimage(images.zimage)
    ram = (0x40000000, 0x80000000)
    advice = crash_advise(zi, ram, 0x48000000, "2.0.25", "6.1", initrd.stat().st_size, 0x101000, runtime)
    size = advice.size >> 20
    assert size > advice.layout_size >> 20  # the memory rules, not the layout, decide here
    # a stage-1 snapshot per crashkernel= value would only fill the cache: both boot
    case = {"kexec_args": (f"--image-size={advice.image_size:#x}",), "initrd_size": 8 << 20, "snapshot": False}
    ok = run_kexec_case("virt", case="advised", mode="kdump", crashkernel=f"{size}M", **case)
    assert ok.verdict.verdict == "pass", (size, ok.verdict.reasons)
    short = run_kexec_case("virt", case="short", mode="kdump", crashkernel=f"{size - 1}M", **case)
    assert short.verdict.verdict == "fail", (size - 1, short.verdict.reasons)
    assert "memory" in " ".join(short.verdict.reasons) or "write error" in " ".join(short.verdict.reasons)
