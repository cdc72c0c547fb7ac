"""The crash kernel's own report on /proc/vmcore (stage-2 init's TESTBENCH-VMCORE line), judged against
the old kernel's RAM; and the crash-mode findings the emulator adds (writes outside the reservation).
Pure: text and numbers in, problems out."""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from .oracle.crash import LOST, CrashRegion
from .oracle.placement import subtract_ranges

VMCORE_MARKER = r"^TESTBENCH-VMCORE (\{.*\})\n"
ET_CORE, EM_ARM, PT_LOAD = 4, 40, 1


@dataclass(frozen=True)
class Vmcore:
    present: bool
    size: int | None = None
    elf_class: int | None = None  # 1: ELF32, 2: ELF64 (LPAE)
    header_problems: tuple[str, ...] = ()
    loads: tuple[tuple[int, int], ...] = ()  # PT_LOAD [p_paddr, p_paddr + p_memsz)
    truncated: bool = False  # more program headers than the init printed

    def to_dict(self) -> dict:
        return {
            "present": self.present,
            "size": self.size,
            "elf_class": self.elf_class,
            "header_problems": list(self.header_problems),
            "pt_load": [list(r) for r in self.loads],
            "truncated": self.truncated,
        }


def parse_elf_core(head: bytes) -> tuple[int | None, tuple[str, ...], tuple[tuple[int, int], ...], bool]:
    """(class, problems, PT_LOAD ranges, truncated) of the first bytes of an ELF core file."""
    if len(head) < 52 or head[:4] != b"\x7fELF":
        return None, (f"no ELF magic (starts {head[:4].hex() or 'empty'})",), (), False
    cls, data = head[4], head[5]
    problems = []
    if data != 1:
        problems.append(f"EI_DATA {data}, not little endian")
    if cls not in (1, 2):
        return None, (*problems, f"EI_CLASS {cls}"), (), False
    e_type, e_machine = struct.unpack_from("<HH", head, 16)
    if e_type != ET_CORE:
        problems.append(f"e_type {e_type}, not ET_CORE")
    if e_machine != EM_ARM:
        problems.append(f"e_machine {e_machine}, not EM_ARM")
    if cls == 1:
        phoff = struct.unpack_from("<I", head, 28)[0]
        phentsize, phnum = struct.unpack_from("<HH", head, 42)
        fmt, fields = "<IIIIII", (0, 3, 5)  # p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz
    else:
        if len(head) < 64:
            return cls, (*problems, "ELF64 header cut short"), (), True
        phoff = struct.unpack_from("<Q", head, 32)[0]
        phentsize, phnum = struct.unpack_from("<HH", head, 54)
        fmt, fields = "<IIQQQQQ", (0, 4, 6)  # p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz
    loads = []
    truncated = False
    for i in range(phnum):
        at = phoff + i * phentsize
        if at + struct.calcsize(fmt) > len(head):
            truncated = True
            break
        words = struct.unpack_from(fmt, head, at)
        if words[fields[0]] == PT_LOAD:
            loads.append((words[fields[1]], words[fields[1]] + words[fields[2]]))
    return cls, tuple(problems), tuple(sorted(loads)), truncated


def parse_vmcore(text: str) -> Vmcore | None:
    match = re.search(VMCORE_MARKER, text, re.MULTILINE)
    if match is None:
        return None
    try:
        d = json.loads(match.group(1))
        if not d.get("present"):
            return Vmcore(False)
        head = bytes.fromhex(d.get("head", ""))
    except ValueError:
        return Vmcore(True, header_problems=("the TESTBENCH-VMCORE line is garbled",))
    cls, problems, loads, truncated = parse_elf_core(head)
    return Vmcore(True, d.get("size"), cls, problems, loads, truncated)


def vmcore_problems(vmcore: Vmcore | None, ram: Sequence[tuple[int, int]], region: CrashRegion) -> list[str]:
    """/proc/vmcore must exist, start with an ELF core header of this machine and have PT_LOAD ranges that
    cover exactly the old kernel's RAM outside the reservation (kexec's Coredump memory ranges)."""
    if vmcore is None:
        return ["the crash kernel's init printed no /proc/vmcore report"]
    if not vmcore.present:
        return ["/proc/vmcore is missing in the crash kernel (no elfcorehdr= taken, or no CRASH_DUMP)"]
    problems = [f"/proc/vmcore ELF header: {p}" for p in vmcore.header_problems]
    if vmcore.elf_class is None:
        return problems
    want = subtract_ranges(sorted(ram), [(region.start, region.end)])
    missing = subtract_ranges(want, vmcore.loads)
    extra = subtract_ranges(vmcore.loads, want)
    if vmcore.truncated:
        problems.append("/proc/vmcore has more program headers than the init printed: coverage not judged")
    else:
        problems += [f"/proc/vmcore PT_LOAD ranges leave the old kernel's RAM [{s:#x}, {e:#x}) out" for s, e in missing]
        problems += [f"/proc/vmcore PT_LOAD covers [{s:#x}, {e:#x}), not the old kernel's RAM" for s, e in extra]
    return problems


# A diff misses written bytes that equal the old ones (the crashed kernel's memory holds a kernel too):
# changed runs closer than a page are one write.
OUTSIDE_GAP = 0x1000
CRASH_START = "Loading crashdump kernel"
# What a crash kernel says when its reservation does not hold it (the kexec signatures are verdict.py's)
KDUMP_SIGNS = (
    (
        r"INITRD: (0x[0-9a-f]+\+0x[0-9a-f]+) is not a memory region - disabling initrd",
        "the crash kernel dropped its initrd ({1} is not in its RAM: mem= counts from where it runs)",
    ),
)


def crash_console(after: str) -> str:
    """The console from the crash kernel's handoff on: stage 1's own panic (the trigger) is no finding."""
    at = after.find(CRASH_START)
    return after[at:] if at >= 0 else after.replace("Kernel panic - not syncing: sysrq triggered crash", "")


def kdump_sign_reasons(after: str) -> list[str]:
    out = []
    for pattern, reason in KDUMP_SIGNS:
        m = re.search(pattern, after)
        if m:
            out.append(reason.format(m.group(0), *m.groups()))
    return out


def merge_writes(clobbers: Sequence[tuple[int, int]], gap: int = OUTSIDE_GAP) -> list[tuple[int, int, int]]:
    """(start, end, changed bytes) of the changed runs, runs closer than `gap` merged."""
    out: list[tuple[int, int, int]] = []
    for s, e in sorted(clobbers):
        if out and s - out[-1][1] < gap:
            out[-1] = (out[-1][0], max(out[-1][1], e), out[-1][2] + e - s)
        else:
            out.append((s, e, e - s))
    return out


def observed_outside(clobbers: Sequence[tuple[int, int]], predicted: Sequence[tuple[int, int]]) -> list[str]:
    """The emulator's writes outside the reservation as findings: one line per range the oracle predicted
    (the changed runs in it, their span and bytes), one per run it did not predict (a disagreement)."""
    lines = []
    runs = merge_writes(clobbers)
    for lo, hi in predicted:
        inside = [r for r in runs if lo <= r[0] and r[1] <= hi]
        if inside:
            n = sum(r[2] for r in inside)
            lines.append(
                f"emulator: decompressor wrote [{inside[0][0]:#x}, {inside[-1][1]:#x}) outside the crash region "
                f"({len(inside)} runs, {n} bytes changed; the oracle's range [{lo:#x}, {hi:#x})): {LOST}"
            )
    for s, e, n in runs:
        if not any(lo <= s and e <= hi for lo, hi in predicted):
            lines.append(
                f"emulator: decompressor wrote [{s:#x}, {e:#x}) outside the crash region ({n} bytes changed), "
                f"where the oracle predicts no write: {LOST}"
            )
    return lines
