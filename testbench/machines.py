"""Machine profiles, loaded from machines.toml. Everything machine-specific lives in that data file."""

import tomllib
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path

from .datafiles import data_path
from .errors import UserError
from .sizes import format_size, parse_size

# How a case's files can reach stage 1 (machines.toml `share`); emulator/share.py says what each one needs.
SHARE_KINDS = ("virtio-9p-device", "virtio-9p-pci", "initramfs")


@dataclass(frozen=True)
class Transport:
    kind: str  # one of SHARE_KINDS
    min_qemu: tuple[int, int] = (0, 0)  # the QEMU version whose board model first has it

    @classmethod
    def parse(cls, text: str) -> "Transport":
        kind, _, version = text.partition("@")
        if kind not in SHARE_KINDS:
            raise ValueError(f"machines.toml: share kind {kind!r} is none of {', '.join(SHARE_KINDS)}")
        major, _, minor = version.partition(".")
        return cls(kind, (int(major), int(minor or 0)) if version else (0, 0))


@dataclass(frozen=True)
class Machine:
    name: str
    qemu_machine: str
    cpu: str
    ram_base: int
    max_ram: int
    default_ram: int
    console: str
    dtb: str  # "qemu" when QEMU generates it, else a DTB file name from the kernel package
    dtb_size: int  # what a placement plans for the DTB kexec loads (QEMU's is padded to 1 MiB)
    dtb_rom: int = 0  # bytes at the RAM base where QEMU puts its DTB when it boots no -kernel
    smp: int = 1  # CPUs this run gives the board (with_smp); the data's value is the default
    max_smp: int = 1
    cpu_hotplug: bool = True  # the board's Linux can take a CPU offline (smp_ops.cpu_kill), as kexec on SMP needs
    console_serial: int = 0  # QEMU serial index of the console UART
    share: tuple[Transport, ...] = (Transport("virtio-9p-device"),)
    uniprocessor_args: tuple[str, ...] = ()  # QEMU arguments only with one CPU (sabrelite: no EL3)
    snapshot_max_smp: int | None = None  # stage-1 snapshots restore only up to this many CPUs (None: any)
    halt_lines: tuple[str, ...] = ()  # console lines after which the guest is halted for good and QEMU stays
    # With the virtio-9p-pci share: stage-1 words, and (PCIe host node, GIC SPI of INTA..INTD as QEMU wires them)
    pci_stage1_cmdline: tuple[str, ...] = ()
    pci_intx: tuple[str, tuple[int, ...]] | None = None
    pci_snapshot: bool = True  # a stage-1 snapshot with that share restores (sabrelite on QEMU 10: it does not)
    machine_options: tuple[str, ...] = ()  # appended to -M as ",key=value"
    qemu_args: tuple[str, ...] = ()
    stage1_cmdline: tuple[str, ...] = ()
    stage2_cmdline: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    needs_audiodev: bool = False  # the board has a sound codec that QEMU wants a backend for

    @property
    def qemu_machine_arg(self) -> str:
        return ",".join([self.qemu_machine, *self.machine_options])

    @property
    def cpu_args(self) -> tuple[str, ...]:
        """QEMU arguments that depend on the CPU count (`-smp` itself and, with one CPU, uniprocessor_args)."""
        return ("-smp", str(self.smp), *(self.uniprocessor_args if self.smp == 1 else ()))

    def snapshot_refused(self, transport: str | None = None) -> str | None:
        """Why stage 1 cannot come from a snapshot with this CPU count and share transport, if it cannot."""
        if transport == "virtio-9p-pci" and not self.pci_snapshot:
            return f"no snapshot: {self.name}'s virtio-9p-pci share does not survive a restore (pci_snapshot)"
        if self.snapshot_max_smp is None or self.smp <= self.snapshot_max_smp:
            return None
        return (
            f"no snapshot: {self.name} restores a saved stage 1 only with up to {self.snapshot_max_smp} CPU(s) "
            f"(machines.toml snapshot_max_smp), this case runs {self.smp}"
        )

    @property
    def qemu_generates_dtb(self) -> bool:
        return self.dtb == "qemu"

    def board_dtb(self, dtb_dir: Path) -> Path | None:
        """The DTB file the board boots with, from the kernel package's DTB dir; None when QEMU makes it."""
        return None if self.qemu_generates_dtb else dtb_dir / self.dtb

    def transport(self, qemu_version: tuple[int, ...]) -> str:
        """The first share transport this QEMU's board model has."""
        for option in self.share:
            if tuple(qemu_version[:2]) >= option.min_qemu:
                return option.kind
        have = ".".join(map(str, qemu_version[:2]))
        known = ", ".join(f"{o.kind} (QEMU {o.min_qemu[0]}.{o.min_qemu[1]}+)" for o in self.share)
        raise UserError(f"{self.name}: QEMU {have} has no way to share files with this board; it knows {known}")

    def with_smp(self, cpus: int) -> "Machine":
        """The board run with `cpus` CPUs (QEMU -smp), within what its model takes."""
        if not 1 <= cpus <= self.max_smp:
            raise UserError(f"{self.name}: --smp {cpus}: this machine runs 1 to {self.max_smp} CPUs")
        return replace(self, smp=cpus)

    def check_ram(self, ram: int) -> None:
        if ram > self.max_ram:
            raise UserError(
                f"{self.name}: RAM {format_size(ram)} is above this machine's maximum of {format_size(self.max_ram)}"
            )
        if ram < 128 << 20:
            raise UserError(f"{self.name}: RAM {format_size(ram)} is too small to boot; use at least 128M")


def _resolve(raw: dict[str, dict], name: str, seen: tuple[str, ...] = ()) -> dict:
    if name in seen:
        raise ValueError(f"machines.toml: inheritance loop through {name}")
    entry = dict(raw[name])
    parent = entry.pop("inherits", None)
    if parent is None:
        return entry
    merged = _resolve(raw, parent, (*seen, name))
    merged.pop("abstract", None)
    merged.update(entry)
    return merged


@cache
def all_machines() -> dict[str, Machine]:
    raw = tomllib.loads(data_path("machines.toml").read_text())
    machines = {}
    for name in raw:
        entry = _resolve(raw, name)
        if entry.pop("abstract", False):
            continue
        machines[name] = Machine(
            name=name,
            qemu_machine=entry["qemu_machine"],
            cpu=entry["cpu"],
            ram_base=int(entry["ram_base"]),
            max_ram=parse_size(entry["max_ram"]),
            default_ram=parse_size(entry["default_ram"]),
            console=entry["console"],
            dtb=entry["dtb"],
            dtb_size=int(entry["dtb_size"]),
            dtb_rom=int(entry.get("dtb_rom", 0)),
            smp=int(entry.get("smp", 1)),
            max_smp=int(entry.get("max_smp", 1)),
            cpu_hotplug=bool(entry.get("cpu_hotplug", True)),
            console_serial=int(entry.get("console_serial", 0)),
            share=tuple(Transport.parse(s) for s in entry.get("share", ["virtio-9p-device"])),
            uniprocessor_args=tuple(entry.get("uniprocessor_args", ())),
            snapshot_max_smp=entry.get("snapshot_max_smp"),
            halt_lines=tuple(entry.get("halt_lines", ())),
            pci_stage1_cmdline=tuple(entry.get("pci_stage1_cmdline", ())),
            pci_snapshot=bool(entry.get("pci_snapshot", True)),
            pci_intx=(entry["pci_intx"]["node"], tuple(entry["pci_intx"]["spi"])) if "pci_intx" in entry else None,
            machine_options=tuple(entry.get("machine_options", ())),
            qemu_args=tuple(entry.get("qemu_args", ())),
            stage1_cmdline=tuple(entry.get("stage1_cmdline", ())),
            stage2_cmdline=tuple(entry.get("stage2_cmdline", ())),
            env=tuple(sorted(entry.get("env", {}).items())),
            needs_audiodev=bool(entry.get("needs_audiodev", False)),
        )
    return machines


def get_machine(name: str) -> Machine:
    machines = all_machines()
    if name not in machines:
        raise UserError(f"unknown machine {name!r}; known machines: {', '.join(machines)}")
    return machines[name]
