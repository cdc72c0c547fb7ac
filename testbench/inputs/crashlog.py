"""What a `kexec --debug -p` run prints beyond a `-l` run (kexec/arch/arm/crashdump-arm.c, 2.0.25):

    Reserved memory ranges / Coredump memory ranges     each followed by "%016llx-%016llx (%d)" lines
    elfcorehdr 0x6bf00000-0x6bf003ff          (2.0.20: "elfcorehdr: 0x6bf00000")
    crashkernel: [0x68000000 - 0x6bffffff] (64M)
    memory range: [0x40000000 - 0x67ffffff] (640M)
    kernel command line: "console=ttyAMA0 ... elfcorehdr=0x6bf00000 mem=64512K"

The Kernel:/Initrd:/DT lines and the segments are read by kexeclog.parse_kexec_log as for any load; its
MEMORY RANGES of a crash run also hold these range lists, so a crash run's RAM is taken from elsewhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_RANGE = re.compile(r"^\s*([0-9a-fA-F]{8,16})-([0-9a-fA-F]{8,16})\s+\((\d+)\)\s*$")


@dataclass(frozen=True)
class CrashLog:
    crashkernel: tuple[int, int] | None  # [start, end) of the reservation kexec found
    elfcorehdr: tuple[int, int] | None  # (address, size)
    command_line: str | None  # the crash kernel's, with elfcorehdr= and mem=
    coredump_ranges: tuple[tuple[int, int], ...]  # [start, end): what the core header describes
    reserved_ranges: tuple[tuple[int, int], ...]

    @property
    def appended(self) -> dict[str, str]:
        """elfcorehdr= and mem= as kexec appended them."""
        words = (self.command_line or "").split()
        return {w.split("=", 1)[0]: w.split("=", 1)[1] for w in words if w.startswith(("elfcorehdr=", "mem="))}

    def to_dict(self) -> dict:
        return {
            "crashkernel": list(self.crashkernel) if self.crashkernel else None,
            "elfcorehdr": list(self.elfcorehdr) if self.elfcorehdr else None,
            "command_line": self.command_line,
            "coredump_ranges": [list(r) for r in self.coredump_ranges],
            "reserved_ranges": [list(r) for r in self.reserved_ranges],
        }


def parse_crash_log(text: str) -> CrashLog:
    crashkernel = elfcorehdr = None
    command_line = None
    lists: dict[str, list[tuple[int, int]]] = {"Coredump": [], "Reserved": []}
    current: str | None = None
    for line in text.splitlines():
        heading = re.match(r"^\s*(Coredump|Reserved) memory ranges\s*$", line)
        if heading:
            current = heading.group(1)
            lists[current] = []
            continue
        r = _RANGE.match(line)
        if r and current is not None:
            lists[current].append((int(r.group(1), 16), int(r.group(2), 16) + 1))
            continue
        current = None
        # 2.0.25 prints "elfcorehdr 0xSTART-0xEND", 2.0.20 "elfcorehdr: 0xSTART" (then a page is taken)
        if m := re.search(r"elfcorehdr:? 0x([0-9a-fA-F]+)(?:-0x([0-9a-fA-F]+))?", line):
            start = int(m.group(1), 16)
            elfcorehdr = (start, int(m.group(2), 16) + 1 - start if m.group(2) else 0x1000)
        elif m := re.search(r"crashkernel: \[0x([0-9a-fA-F]+) - 0x([0-9a-fA-F]+)\]", line):
            crashkernel = (int(m.group(1), 16), int(m.group(2), 16) + 1)
        elif m := re.search(r'kernel command line: "(.*)"\s*$', line):
            command_line = m.group(1)
    return CrashLog(crashkernel, elfcorehdr, command_line, tuple(lists["Coredump"]), tuple(lists["Reserved"]))
