"""The audit's model fixes where the emulator can show them (DOMAIN 9.2, 9.3): kexec's --mem-min, and the
decompressor's kernel_address fallback for RAM off a 128 MiB boundary (Linux >= 5.12, fdt_check_mem_start,
which reads the DTB's /memory)."""

from __future__ import annotations

import argparse
from pathlib import Path

from testbench.replay import replay
from testbench.replay_cli import request_from_args


def test_mem_min_moves_every_segment_and_the_oracle_follows(run_kexec_case):
    """--mem-min bounds every locate_hole: on virt (RAM from 0x40000000) the kernel goes to 0x50008000,
    and the oracle's placement for the same arguments says so."""
    result = run_kexec_case("virt", kexec_args=("--mem-min=0x50000000", "--image-size=0x2000000"))
    load = result.load or {}
    assert load["kernel"]["address"] == 0x50008000, load.get("kernel")
    assert result.placement is not None and result.placement.agrees, result.placement
    assert result.verdict.verdict == "pass", result.verdict
    assert result.agreement is not None and result.agreement.agrees


def test_memory_off_a_128m_boundary_uses_the_fallback_kernel_address(images, tmp_path: Path):
    """/memory from 0x4C000000 on virt, the zImage at 0x4C008000: (pc & 0xf8000000) + TEXT_OFFSET would be
    0x48208000, outside /memory; Debian's 6.1 falls back to the memory base rounded up to 2 MiB, so the
    kernel entry (the observer's second stop, a hardware breakpoint at the predicted address) is
    0x4C208000 and the second kernel boots from there."""
    args = argparse.Namespace(
        machine="virt",
        ram=None,
        kernel="debian",
        initrd=None,
        initrd_size="1M",
        seed=1,
        dtb=None,
        kernel_at="+0xC008000",
        initrd_at="+0xE000000",
        dtb_at="+0xE200000",
        memory_start="+0xC000000",
        from_log=None,
        until=None,
        decompress_deadline=None,
        no_halt_check=False,
        out=str(tmp_path / "replay"),
    )
    result = replay(request_from_args(args))
    kernel_stop = next(s for s in result["observed"]["stops"] if s["name"] == "kernel")
    assert kernel_stop["reached"] and kernel_stop["pc"] == 0x4C208000, kernel_stop
    assert next(r for r in result["predicted"]["layout"] if r["name"] == "kernel")["start"] == 0x4C208000
    assert result["verdict"] == "pass", result["reasons"]
    assert result["oracle_agrees"], result["oracle_difference"]
