"""Machine profiles, loaded from machines.toml. Everything machine-specific lives in that data file."""

import tomllib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from .datafiles import data_path
from .errors import UserError
from .sizes import format_size, parse_size


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
    smp: int = 1
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
    def qemu_generates_dtb(self) -> bool:
        return self.dtb == "qemu"

    def board_dtb(self, dtb_dir: Path) -> Path | None:
        """The DTB file the board boots with, from the kernel package's DTB dir; None when QEMU makes it."""
        return None if self.qemu_generates_dtb else dtb_dir / self.dtb

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
