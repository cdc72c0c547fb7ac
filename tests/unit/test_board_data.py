"""The boards as data (machines.toml): RAM bases, share transports per QEMU version, CPU counts and their
quirks, and what they make of QEMU's command line and the stage-1 commands. Expected values are the facts
of QEMU's board models and DOMAIN 9.4, written by hand."""

import os
import socket
import stat
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from testbench.emulator.console import Console
from testbench.emulator.qemu import QemuSpec, qemu_args
from testbench.errors import UserError
from testbench.machines import Transport, all_machines, get_machine
from testbench.prepare import CaseRequest, PreparedCase, _nr_cpus, guest_commands


def test_five_ram_bases_and_a_board_for_each():
    bases = {m.name: m.ram_base for m in all_machines().values()}
    assert {bases["midway"], bases["sabrelite"], bases["virt"], bases["vexpress-a9"], bases["vexpress-a15"]} == {
        0x0,
        0x10000000,
        0x40000000,
        0x60000000,
        0x80000000,
    }


@pytest.mark.parametrize(
    ("machine", "qemu", "kind"),
    [
        ("virt", (7, 2, 0), "virtio-9p-device"),
        ("sabrelite", (7, 2, 0), "initramfs"),  # QEMU 7.2's i.MX6: no virtio-mmio, no PCIe
        ("sabrelite", (8, 2, 1), "initramfs"),
        ("sabrelite", (9, 0, 0), "virtio-9p-pci"),  # DesignWare PCIe since 9.0
        ("sabrelite", (10, 0, 13), "virtio-9p-pci"),  # Debian 13
        ("midway", (10, 0, 13), "initramfs"),  # no PCI at all
    ],
)
def test_the_share_transport_is_the_first_this_qemu_has(machine, qemu, kind):
    assert get_machine(machine).transport(qemu) == kind


def test_a_share_kind_is_checked_and_a_board_without_one_for_this_qemu_is_a_user_error():
    assert Transport.parse("virtio-9p-pci@9.0") == Transport("virtio-9p-pci", (9, 0))
    with pytest.raises(ValueError, match="share kind"):
        Transport.parse("nfs")
    newer_only = replace(get_machine("sabrelite"), share=(Transport("virtio-9p-pci", (9, 0)),))
    with pytest.raises(UserError, match="no way to share"):
        newer_only.transport((7, 2, 0))


def test_smp_within_what_the_board_runs():
    assert get_machine("virt").with_smp(4).smp == 4
    assert get_machine("virt").smp == 1  # the data's default is untouched
    with pytest.raises(UserError, match="1 to 4 CPUs"):
        get_machine("sabrelite").with_smp(5)
    with pytest.raises(UserError, match="1 to 1 CPUs"):
        get_machine("highbank").with_smp(2)  # its DTB's MPIDRs are not QEMU's: one CPU comes up
    with pytest.raises(UserError):
        get_machine("midway").with_smp(0)


def _spec(machine: str, smp: int = 1, transport: str | None = None, share: Path | None = Path("/share")) -> QemuSpec:
    m = get_machine(machine).with_smp(smp)
    return QemuSpec(m, 1 << 30, Path("/k"), Path("/i"), "console=x", None, share, transport=transport)


def _after(args: list[str], flag: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == flag]


def test_sabrelite_console_is_the_second_serial_port_and_its_share_has_no_device():
    args = qemu_args(_spec("sabrelite", transport="initramfs"), None)
    assert _after(args, "-serial") == ["null", "mon:stdio"]
    assert "-fsdev" not in args and "-device" not in args
    assert _after(args, "-M") == ["sabrelite"] and _after(args, "-smp") == ["1"]


def test_sabrelite_runs_without_el3_on_one_cpu_only():
    # one CPU: no EL3, so its snapshot restores; several: the SRC needs EL3 to start them, no snapshot
    one, four = (qemu_args(_spec("sabrelite", n, "initramfs"), None) for n in (1, 4))
    assert _after(one, "-global") == ["cortex-a9-arm-cpu.has_el3=off"]
    assert _after(four, "-global") == [] and _after(four, "-smp") == ["4"]
    assert get_machine("sabrelite").snapshot_refused() is None
    assert "snapshot_max_smp" in (get_machine("sabrelite").with_smp(4).snapshot_refused() or "")
    assert get_machine("midway").with_smp(4).snapshot_refused() is None


def test_a_9p_pci_share_and_the_first_serial_port_elsewhere():
    args = qemu_args(_spec("sabrelite", transport="virtio-9p-pci"), None)
    assert _after(args, "-device") == ["virtio-9p-pci,fsdev=tbfs,mount_tag=tbshare"]
    virt = qemu_args(_spec("virt", 2, "virtio-9p-device"), None)
    assert _after(virt, "-serial") == ["mon:stdio"] and _after(virt, "-smp") == ["2"]
    assert _after(virt, "-device") == ["virtio-9p-device,fsdev=tbfs,mount_tag=tbshare"]


def test_nr_cpus_only_where_qemu_runs_fewer_cpus_than_the_dtb_lists_on_a_board_without_hotplug(tmp_path: Path):
    dtb = tmp_path / "two-cpus.dtb"
    cpus = "cpu@0 { reg = <0>; }; cpu@1 { reg = <1>; };"
    dts = f"/dts-v1/; / {{ cpus {{ #address-cells = <1>; #size-cells = <0>; {cpus} }}; }};"
    subprocess.run(["dtc", "-I", "dts", "-O", "dtb", "-o", str(dtb)], input=dts.encode(), check=True)
    a15 = get_machine("vexpress-a15")
    assert _nr_cpus(a15, dtb) == ["nr_cpus=1"]
    assert _nr_cpus(a15.with_smp(2), dtb) == []  # as many as listed: the refusal is the board's own
    assert _nr_cpus(get_machine("midway"), dtb) == []  # PSCI takes CPUs offline: nothing to hide
    assert _nr_cpus(get_machine("virt"), None) == []  # QEMU's DTB lists exactly -smp CPUs


def _case(tmp_path: Path, machine: str, transport: str, kexec: str) -> PreparedCase:
    m = get_machine(machine)
    spec = QemuSpec(m, 1 << 30, None, None, "", None, tmp_path, transport=transport)
    request = CaseRequest(machine=m, ram=1 << 30, out=tmp_path)
    return PreparedCase(request, tmp_path, spec, None, None, {}, None, kexec, {})  # type: ignore[arg-type]


def test_a_read_only_share_sends_the_guest_files_back_and_keeps_kexec_exit_code(tmp_path: Path):
    # The commands, run by a host shell against stand-ins: kexec fails with 3, tb-put logs what it sends.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("kexec", "echo loading; exit 3"), ("tb-put", f'echo "$@" >> {tmp_path}/sent')):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(stat.S_IRWXU)
    setup, version, load, execute = guest_commands(_case(tmp_path, "midway", "initramfs", "kexec --debug -l Z"))
    assert "mount" not in setup and version == "kexec --version" and execute == "kexec -e"
    assert setup.endswith("tb-put /mnt/iomem.txt /mnt/cpus.txt /mnt/board.dtb")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    run = subprocess.run(["sh", "-c", load.replace("/mnt", str(tmp_path))], env=env, capture_output=True, text=True)
    assert run.returncode == 3
    assert (tmp_path / "kexec-debug.txt").read_text() == "loading\n"
    assert (tmp_path / "sent").read_text() == f"{tmp_path}/kexec-debug.txt\n"


def test_a_9p_share_is_mounted_and_sends_nothing_back(tmp_path: Path):
    setup, _, load, _ = guest_commands(_case(tmp_path, "virt", "virtio-9p-device", "kexec --debug -l Z"))
    assert setup.startswith("{ grep -q ' /mnt ' /proc/mounts || mount -t 9p ")
    assert "tb-put" not in setup + load
    assert load == "kexec --debug -l Z > /mnt/kexec-debug.txt 2>&1"


def test_a_halt_line_ends_qemu_once_even_when_it_arrives_in_pieces(tmp_path: Path):
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(tmp_path / "con.sock"))
    server.listen(1)
    calls: list[float] = []
    halts = get_machine("sabrelite").halt_lines
    console = Console(
        tmp_path / "con.sock", tmp_path / "console.log", halt_lines=halts, on_halt=lambda: calls.append(1)
    )
    peer, _ = server.accept()
    try:
        peer.sendall(b"[    2.28] Kernel panic - not syncing: VFS: Unable to mount root fs\r\n[    4.43] Reboot fai")
        console.wait_for("Reboot fai", 5, "the first piece")
        assert calls == []
        peer.sendall(b"led -- System halted\r\n")
        console.wait_for("System halted\n", 5, "the second piece")
        peer.sendall(b"reboot: System halted\r\n")  # a second halt line: QEMU is already being ended
        console.wait_for("reboot: System halted\n", 5, "the third line")
        assert calls == [1]
    finally:
        peer.close()
        console.close()
        server.close()
    assert get_machine("midway").halt_lines == ()  # its reset ends QEMU by itself (-no-reboot)
