"""The end-to-end loop on every machine: Debian's armmp 6.1 zImage (TEXT_OFFSET 0x208000) under kexec-tools'
default placement must fail, and must pass once --image-size leaves room for the relocated decompressor."""

import json

import pytest

from testbench.inputs.initramfs import payload_bytes

MACHINES = ["virt", "vexpress-a9", "vexpress-a15"]
ROOMY = ("--image-size=0x2000000",)


@pytest.mark.parametrize("machine", MACHINES)
def test_default_placement_fails_and_names_the_victim(run_kexec_case, machine):
    result = run_kexec_case(machine)
    assert result.verdict.verdict == "fail", result.verdict
    # kexec -l itself succeeded; the failure is after kexec -e.
    assert result.kexec_rc == 0
    assert result.verdict.phase in ("handoff", "decompress", "kernel"), result.verdict
    assert any("dtb" in r.lower() or "initrd" in r.lower() for r in result.verdict.reasons), result.verdict
    # kexec placed the initrd where kexec-tools' 0x8000 assumption puts it, right after its kernel guess.
    load = result.load
    assert load["kernel"]["address"] == result.request.machine.ram_base + 0x8000
    assert load["initrd"]["address"] < load["kernel"]["address"] + 0x1AE4000


@pytest.mark.parametrize("machine", MACHINES)
def test_image_size_placement_passes_with_payload_verified(run_kexec_case, machine):
    result = run_kexec_case(machine, kexec_args=ROOMY, initrd_size=1 << 20, seed=7)
    assert result.verdict.verdict == "pass", result.verdict
    stage2 = result.stage2
    import hashlib

    assert stage2["payload_sha256"] == hashlib.sha256(payload_bytes(1 << 20, 7)).hexdigest()
    assert stage2["payload_size"] == 1 << 20
    assert "panic=-1" in stage2["cmdline"]
    on_disk = json.loads((result.request.out / "result.json").read_text())
    assert on_disk["verdict"] == "pass" and on_disk["stage2"]["payload_sha256"] == stage2["payload_sha256"]
    for artifact in ("console.log", "qemu.cmdline", "repro.sh", "kexec-debug.txt", "iomem.txt"):
        assert (result.request.out / artifact).stat().st_size > 0, artifact


def test_virt_32m_initrd_default_placement_breaks_initramfs(run_kexec_case):
    result = run_kexec_case("virt", initrd_size=32 << 20)
    assert result.verdict.verdict == "fail"
    assert any("Initramfs unpacking failed" in r for r in result.verdict.reasons), result.verdict
