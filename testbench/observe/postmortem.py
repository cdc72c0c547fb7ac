"""The post-mortem of a stop that never came, for a reader without symbols.

The VM is halted and the post-mortem says: the PC and the instruction there (a branch-to-self with
interrupts masked is a halt loop: the kernel entry can never come, so the bench stops waiting at once),
which region of the layout and which zImage offset the PC is in, strings the registers point at (the
decompressor's error() keeps its message in a register), what was written in the pattern window (how far
the decompressed output got) and any kernel log lines. `Hang` holds it; `hang_reasons` words it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .evidence import PATTERN, diff_ranges
from .plan import Plan

ARM_B_SELF = bytes.fromhex("feffffea")  # `b .` in ARM state (0xeafffffe, little-endian)
THUMB_B_SELF = bytes.fromhex("fee7")  # `b .` in Thumb state (0xe7fe)
CPSR_T, CPSR_F, CPSR_I = 1 << 5, 1 << 6, 1 << 7
# Writes in the pattern window closer than this are one range in a hang's post-mortem: decompressed output
# matches the pattern word by chance now and then, and page-sized granularity is what a reader needs.
HANG_COALESCE = 4096
STRING_PROBE = 96  # bytes read at each register value that might point at a message
# Kernel log lines worth quoting from a RAM dump after a silent hang. "Booting Linux on physical CPU" and not
# just "Booting Linux": the zImage's EFI stub holds "Booting Linux Kernel..." as a plain string (no '%').
LOG_PATTERNS = (
    rb"(Error: invalid dtb[^\x00\n]*|Booting Linux on physical CPU[^\x00\n]*|Kernel panic[^\x00\n]*|"
    rb"Initramfs unpacking failed[^\x00\n]*|INITRD: [^\x00\n]*|Unable to handle[^\x00\n]*)"
)


@dataclass(frozen=True)
class Written:
    """A range of the pattern window the guest wrote after the fill, and the layout regions it overlaps."""

    start: int
    end: int
    regions: tuple[str, ...] = ()


@dataclass(frozen=True)
class Output:
    """How far the decompressed kernel got: its region [start, start + size) was written up to `end`."""

    start: int
    size: int
    end: int | None


@dataclass(frozen=True)
class Hang:
    phase: str  # the stop that never came: handoff (zImage entry) or decompress (kernel entry)
    deadline: float  # seconds, scaled
    waited: float
    found_by: str  # "deadline" or "halt check"
    pc: int | None = None  # None: the VM could not be examined (see `error`)
    cpsr: int | None = None
    registers: tuple[int, ...] = ()
    insn: str = ""  # the instruction at the PC, as a hex word
    halted_for_good: bool = False
    written: tuple[Written, ...] | None = None  # None: no pattern window
    output: Output | None = None  # None: the layout has no kernel region
    mmu_on: bool = False  # the PC is virtual: where/zimage_offset/strings mean nothing then
    where: tuple[str, ...] = ()
    zimage_offset: int | None = None
    strings: dict[str, dict[str, str]] = field(default_factory=dict)  # "r0" -> {"past": ..., "at": ...}
    error: str | None = None
    reasons: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        d: dict = {"phase": self.phase, "deadline": self.deadline, "waited": self.waited, "found_by": self.found_by}
        if self.pc is not None:
            d |= {
                "pc": self.pc,
                "cpsr": self.cpsr,
                "registers": list(self.registers),
                "insn": self.insn,
                "halted_for_good": self.halted_for_good,
            }
            if self.written is not None:
                d["written"] = [{"start": w.start, "end": w.end, "regions": list(w.regions)} for w in self.written]
            if self.output is not None:
                d |= {"output_start": self.output.start, "output_size": self.output.size, "output_end": self.output.end}
            if self.mmu_on:
                d["mmu_on"] = True
            else:
                d |= {"where": list(self.where), "zimage_offset": self.zimage_offset, "strings": self.strings}
        if self.error is not None:
            d["error"] = self.error
        d["reasons"] = list(self.reasons)
        return d


def is_branch_to_self(code: bytes, thumb: bool) -> bool:
    """Is the instruction at the start of `code` a branch to itself (`b .`)?"""
    return code[:2] == THUMB_B_SELF if thumb else code[:4] == ARM_B_SELF


def halted_for_good(code: bytes, cpsr: int | None) -> bool:
    """A `b .` with IRQ and FIQ masked can only be left by a reset: whatever the CPU waits for never comes.
    Without CPSR we cannot rule out an interrupt handler that rewrites the return address."""
    if cpsr is None:
        return False
    return is_branch_to_self(code, bool(cpsr & CPSR_T)) and cpsr & (CPSR_I | CPSR_F) == CPSR_I | CPSR_F


def regions_at(regions: tuple[tuple[str, int, int], ...], start: int, end: int) -> list[str]:
    """Names of the layout regions overlapping [start, end)."""
    return [name for name, s, e in regions if s < end and start < e]


def pattern_writes(
    window: bytes, window_start: int, gaps: list[tuple[int, int]], coalesce: int = HANG_COALESCE
) -> list[tuple[int, int]]:
    """Absolute ranges of the filled gaps (inside a dump of the window starting at `window_start`) that no
    longer hold the pattern: what the guest wrote since the fill."""
    out: list[tuple[int, int]] = []
    for s, e in gaps:
        n = (e - s) // 4 * 4
        got = window[s - window_start : s - window_start + n]
        for a, b in diff_ranges(PATTERN * (n // 4), got, coalesce):
            if out and s + a - out[-1][1] < coalesce:
                out[-1] = (out[-1][0], s + b)
            else:
                out.append((s + a, s + b))
    return out


def _printable(raw: bytes) -> bool:
    return all(32 <= b < 127 or b in (9, 10, 13) for b in raw)


def string_at(data: bytes, minimum: int = 8) -> str | None:
    """A printable NUL-terminated string at the start of `data`, at least `minimum` characters long."""
    text, nul, _ = data.partition(b"\0")
    if not nul or len(text) < minimum or not _printable(text):
        return None
    return text.decode().strip()


def string_before(data: bytes, minimum: int = 8) -> str | None:
    """The printable string that ends with the NUL at the last byte of `data`: what a pointer just past
    `data` has walked over (a print loop leaves its pointer one past the terminator)."""
    if not data.endswith(b"\0"):
        return None
    text = data[:-1].rsplit(b"\0", 1)[-1]
    start = len(text)
    while start > 0 and _printable(text[start - 1 : start]):
        start -= 1
    text = text[start:]
    if len(text) < minimum:
        return None
    return text.decode().strip()


def locate_in(haystack: bytes, needle: bytes) -> int | None:
    """Offset of the only occurrence of `needle` in `haystack`, or None (absent or ambiguous)."""
    first = haystack.find(needle)
    if first < 0 or haystack.find(needle, first + 1) >= 0:
        return None
    return first


def output_progress(regions: tuple[tuple[str, int, int], ...], writes: list[tuple[int, int]]) -> Output | None:
    """How far the decompressed kernel got: the highest written byte inside the layout's `kernel` region.
    The decompressor writes its output in one pass, low to high, straight to its final place."""
    kernel = next(((s, e) for name, s, e in regions if name == "kernel"), None)
    if kernel is None:
        return None
    inside = [min(e, kernel[1]) for s, e in writes if s < kernel[1] and kernel[0] < e]
    return Output(kernel[0], kernel[1] - kernel[0], max(inside) if inside else None)


def hang_reasons(hang: Hang, plan: Plan) -> list[str]:
    """One line per finding of a post-mortem, most decisive first."""
    phase = hang.phase
    target = f"kernel entry {plan.kernel_entry:#x}" if phase == "decompress" else f"zImage entry {plan.entry:#x}"
    head = f"the {target} never came within the {phase} deadline ({hang.deadline:.0f} s)"
    pc = hang.pc
    if pc is None:
        return [head + (f"; {hang.error}" if hang.error is not None else "")]
    if hang.found_by == "halt check":
        head += (
            f": {hang.waited:.1f} s after the zImage entry the CPU spins in a branch-to-self at {pc:#x} "
            "with IRQ and FIQ masked, so it never will"
        )
    else:
        head += f"; halted after {hang.waited:.1f} s at PC {pc:#x} (instruction {hang.insn})"
        if hang.halted_for_good:
            head += ", a branch-to-self with IRQ and FIQ masked: it never would have"
    reasons = [head]
    if hang.where or hang.zimage_offset is not None:
        where = " and ".join(hang.where) or "no region of the layout"
        offset = f" = zImage file offset {hang.zimage_offset:#x}" if hang.zimage_offset is not None else ""
        reasons.append(f"PC {pc:#x} lies in {where}{offset}")
    # A register just past a message and not at the start of the next string is the strong clue: a print
    # loop walked over the message (the Debian zImage's error() leaves r0 so). Strings sit back to back in
    # .rodata, so a base pointer at one string is also "just past" the one before: those are ambiguous and
    # quoted only when there is no strong clue (result.json has them all).
    strong = [
        f"{reg} points just past the message {k['past']!r} (as a print loop leaves its pointer)"
        for reg, k in hang.strings.items()
        if "past" in k and "at" not in k
    ]
    weak = [
        f"{reg} points at the string {k['at']!r}" if "at" in k else f"{reg} points just past {k['past']!r}"
        for reg, k in hang.strings.items()
    ]
    reasons += strong or weak
    if hang.output is not None and hang.output.size:
        end, start, size = hang.output.end, hang.output.start, hang.output.size
        if end is None:
            reasons.append(f"the decompressed kernel [{start:#x}, {start + size:#x}) was not written at all")
        else:
            done = end - start
            reasons.append(
                f"the decompressed kernel was written up to {end:#x}: {done:#x} of {size:#x} bytes "
                f"({100 * done // size}%)" + ("" if done < size else ", i.e. all of it")
            )
    if hang.error is not None:
        reasons.append(hang.error)
    return reasons


def kernel_log_lines(data: bytes) -> tuple[str, ...]:
    seen: list[str] = []
    for m in re.finditer(LOG_PATTERNS, data):
        # The kernel's .rodata holds the same words as printk formats; a format has a '%' before its NUL
        # (often on a later line), a log record has none.
        tail = data[m.start() : m.start() + 256].split(b"\0", 1)[0]
        line = m.group(0).decode(errors="replace").strip()
        if b"%" not in tail and line not in seen:
            seen.append(line)
    return tuple(seen[:12])
