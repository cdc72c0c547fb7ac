"""Mode kdump in a case's request: stage 1's crashkernel= word, `kexec -p`, the crash kernel's extra
command-line words, the panic as the start, and clear refusals of what cannot be run."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from testbench.emulator.qemu import QemuSpec
from testbench.errors import UserError
from testbench.machines import get_machine
from testbench.prepare import CaseRequest, PreparedCase, _crash_words, guest_commands


def test_a_kdump_request_adds_the_crash_kernels_words(tmp_path: Path):
    virt = get_machine("virt")
    kexec = CaseRequest(machine=virt, ram=1 << 30, out=tmp_path)
    kdump = replace(kexec, mode="kdump")
    assert "maxcpus=1" not in kexec.stage2_cmdline.split()
    words = kdump.stage2_cmdline.split()
    assert {"maxcpus=1", "reset_devices"} <= set(words) and words[-1] == "panic=-1"
    assert _crash_words(kexec) == []
    assert _crash_words(kdump) == ["crashkernel=64M"]
    assert _crash_words(replace(kdump, crashkernel="64M@0x50000000")) == ["crashkernel=64M@0x50000000"]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"crashkernel": "lots"}, "--crashkernel lots: expected SIZE[@ADDR]"),
        ({"crashkernel": "64M@"}, "--crashkernel 64M@: expected SIZE[@ADDR]"),
        ({"mode": "crash"}, "--mode crash: choose one of kexec, kdump"),
        ({"until": "kernel-entry"}, "--until kernel-entry is for kexec -l cases"),
    ],
)
def test_what_kdump_cannot_take_is_one_clear_line(tmp_path: Path, changes: dict, message: str):
    request = replace(CaseRequest(machine=get_machine("virt"), ram=1 << 30, out=tmp_path, mode="kdump"), **changes)
    with pytest.raises(UserError, match="^" + message.replace("[", r"\[").replace("]", r"\]")):
        _crash_words(request)


def test_a_kdump_case_ends_with_the_panic(tmp_path: Path):
    m = get_machine("virt")
    spec = QemuSpec(m, 1 << 30, None, None, "", None, tmp_path, transport="virtio-9p-device")
    request = CaseRequest(machine=m, ram=1 << 30, out=tmp_path, mode="kdump")
    case = PreparedCase(request, tmp_path, spec, None, None, {}, None, "kexec --debug -p Z", {})  # type: ignore[arg-type]
    *_, load, start = guest_commands(case)
    assert load.startswith("kexec --debug -p Z") and start == "echo c > /proc/sysrq-trigger"
