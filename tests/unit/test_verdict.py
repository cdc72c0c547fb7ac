"""The verdict's signature table and stage-2 checks, on console text captured from real QEMU runs
(tests/unit/data/console_*.txt: Debian armmp 6.1 on virt, kexec-tools 2.0.25)."""

import hashlib
from pathlib import Path

from testbench.verdict import judge_stage2, parse_stage2, phase_reached

DATA = Path(__file__).parent / "data"
CMDLINE = "console=ttyAMA0 earlycon=pl011,0x09000000 panic=-1"


def _text(name: str) -> str:
    return (DATA / name).read_text()


def _sha_of_payload(size: int, seed: int) -> str:
    # The stage-2 payload is documented as SHAKE-256 of "testbench-payload-<seed>"; recompute it here.
    return hashlib.sha256(hashlib.shake_256(b"testbench-payload-%d" % seed).digest(size)).hexdigest()


def test_silence_after_bye_is_a_handoff_failure():
    verdict = judge_stage2(_text("console_virt_silent.txt"), CMDLINE, None, "silence")
    assert (verdict.verdict, verdict.phase) == ("fail", "handoff")
    assert "silence after Bye!" in verdict.reasons[0]


def test_clobbered_32m_initrd_names_the_initrd_and_the_panic():
    verdict = judge_stage2(_text("console_virt_32m_default.txt"), CMDLINE, None, "exit")
    assert (verdict.verdict, verdict.phase) == ("fail", "kernel")
    assert verdict.reasons[0].startswith("initrd clobbered: Initramfs unpacking failed: invalid magic")
    assert any(r.startswith("Kernel panic: VFS: Unable to mount root fs") for r in verdict.reasons)


def test_initramfs_write_error_is_a_ram_shortage_not_a_clobber():
    text = _text("console_virt_256m_100m.txt")
    verdict = judge_stage2(text, CMDLINE, _sha_of_payload(100 << 20, 1), "marker")
    assert verdict.verdict == "fail"
    assert any("did not fit in RAM" in r for r in verdict.reasons)
    assert not any(r.startswith("initrd clobbered") for r in verdict.reasons)


def test_marker_with_matching_payload_and_cmdline_passes():
    text = "[    1.8] Run /init as init process\nTESTBENCH-STAGE2-INIT\n" + _text("console_virt_pass_marker.txt")
    stage2 = parse_stage2(text)
    assert stage2 is not None and stage2.payload_size == 1 << 20
    assert stage2.iomem_ram == ("40000000-7fffffff",)  # 1 GiB at virt's RAM base
    verdict = judge_stage2(text, CMDLINE, _sha_of_payload(1 << 20, 1), "marker")
    assert (verdict.verdict, verdict.phase) == ("pass", "init")


def test_marker_with_other_payload_or_cmdline_fails():
    text = _text("console_virt_pass_marker.txt")
    assert judge_stage2(text, CMDLINE, _sha_of_payload(1 << 20, 2), "marker").verdict == "fail"
    assert judge_stage2(text, CMDLINE + " quiet", _sha_of_payload(1 << 20, 1), "marker").verdict == "fail"


def test_phase_follows_the_last_progress_line():
    assert phase_reached("[ 4.0] Bye!\n") == "handoff"
    assert phase_reached("[ 4.0] Bye!\n[ 0.0] Booting Linux on physical CPU 0x0\n") == "kernel"
    assert phase_reached(_text("console_virt_256m_100m.txt")) == "init"
