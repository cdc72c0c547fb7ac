"""Ground truth from the emulator: stop at the zImage entry and at the kernel entry, dump every segment.

The flow (DOMAIN.md 8.4): after `kexec -l`, attach to QEMU's gdbstub and set two hardware breakpoints,
at kexec's entry (the zImage) and at RAM base + TEXT_OFFSET (the decompressed kernel). At the first stop
the segments are dumped with QMP pmemsave and compared with the files (load fidelity), and the free RAM
above the kernel segment is filled with a pattern. At the second stop the segments are dumped again and
diffed: the differing byte ranges are exactly what the decompressor clobbered; the highest byte of the
pattern window that changed is the real extent of its writes. While gdb holds the VM, gdb owns run/stop:
we never send QMP stop/cont in between, only pmemsave (which works on a stopped VM).

When a stop never comes, the VM is halted and the post-mortem says what can be said without symbols: the PC
and the instruction there (a branch-to-self with interrupts masked is a halt loop: the kernel entry can
never come, so the bench stops waiting at once), which region of the layout and which zImage offset the PC
is in, strings the registers point at (the decompressor's error() keeps its message in a register), what
was written in the pattern window (how far the decompressed output got) and any kernel log lines.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .console import timeout_factor
from .gdbstub import GdbError, GdbStub, Stop
from .kexeclog import KexecLog
from .oracle.footprint import kernel_address
from .zimage import ZImage

# Seconds, before TESTBENCH_TIMEOUT_FACTOR. Measured: kexec -e to zImage entry 0.5-0.7 s, zImage entry to
# kernel entry (XZ) 1.9-2.4 s (DOMAIN 8.5); 30 s leaves a wide margin for a loaded host.
STOP_DEADLINES = {"handoff": 30.0, "decompress": 30.0}
# Two clobbered runs closer than this are one range: a written byte that happens to equal the old byte is
# invisible to a diff, and over random data that happens for 1 byte in 256, so runs split by a few
# coincidences are really one write.
COALESCE = 64
# The fill pattern for free RAM: a word no decompressor writes by accident (not 0, not a code pattern).
PATTERN = bytes.fromhex("5aa5c33c")
FILL_ABOVE_FOOTPRINT = 1 << 20  # how far past the oracle's footprint the pattern window reaches
FILL_DEFAULT = 48 << 20  # the window without an oracle footprint
SCTLR_M = 1  # SCTLR bit 0: MMU enable
# While waiting for the kernel entry, look at the PC this often: a CPU halted for good is found in seconds
# instead of at the deadline. Not scaled: it is a sampling period, not a deadline.
SPIN_SAMPLE = 1.0
# Dumps kept as evidence: a segment that changed between the stops is kept whole up to this size; a bigger
# one (a 100 MB initrd with 2 MB clobbered) keeps only its changed ranges, unless they are too many pieces.
KEEP_WHOLE = 8 << 20
MAX_PIECES = 64
ARM_B_SELF = bytes.fromhex("feffffea")  # `b .` in ARM state (0xeafffffe, little-endian)
THUMB_B_SELF = bytes.fromhex("fee7")  # `b .` in Thumb state (0xe7fe)
CPSR_T, CPSR_F, CPSR_I = 1 << 5, 1 << 6, 1 << 7
# Writes in the pattern window closer than this are one range in a hang's post-mortem: decompressed output
# matches the pattern word by chance now and then, and page-sized granularity is what a reader needs.
HANG_COALESCE = 4096
STRING_PROBE = 96  # bytes read at each register value that might point at a message
# Kernel log lines worth quoting from a RAM dump after a silent hang. "Booting Linux on physical CPU" and not
# just "Booting Linux": the zImage's EFI stub holds "Booting Linux Kernel..." as a plain string (no '%').
LOG_PATTERNS = rb"(Error: invalid dtb[^\x00\n]*|Booting Linux on physical CPU[^\x00\n]*|Kernel panic[^\x00\n]*|" \
               rb"Initramfs unpacking failed[^\x00\n]*|INITRD: [^\x00\n]*|Unable to handle[^\x00\n]*)"


@dataclass(frozen=True)
class SegmentSpec:
    role: str  # kernel | initrd | dtb | other
    start: int
    size: int  # bytes kexec copied (bufsz); the dump covers these
    source: Path | None = None  # the host file this segment was loaded from, for the fidelity check


@dataclass(frozen=True)
class Plan:
    entry: int  # kexec's entry: the zImage
    kernel_entry: int  # RAM base + TEXT_OFFSET (after the fdt_check_mem_start correction)
    text_offset: int
    text_offset_source: str
    dtb: int | None
    segments: tuple[SegmentSpec, ...]
    fill: tuple[int, int] | None  # pattern window [start, end), free RAM only
    bootargs: str | None = None  # what the DTB's /chosen/bootargs must say
    regions: tuple[tuple[str, int, int], ...] = ()  # the oracle's layout (name, start, end), RAM excluded
    ram: tuple[int, int] | None = None


@dataclass(frozen=True)
class StopReport:
    name: str  # "zimage" or "kernel"
    expected_pc: int
    reached: bool
    seconds: float | None  # from kexec -e (zimage) or from the zImage stop's resume (kernel)
    pc: int | None = None
    r2: int | None = None
    sctlr: int | None = None
    mmu_off: bool | None = None
    problems: tuple[str, ...] = ()


@dataclass(frozen=True)
class Clobber:
    segment: str
    start: int
    end: int  # exclusive
    offset: int  # from the segment start
    end_offset: int

    @property
    def label(self) -> str:
        return f"{self.segment} [{self.start:#x}, {self.end:#x}) = +{self.offset:#x}..+{self.end_offset:#x}"


@dataclass(frozen=True)
class Observation:
    phase: str  # the phase the observation saw die, or "kernel" when both stops came
    stops: tuple[StopReport, ...]
    fidelity: tuple[str, ...]  # load fidelity problems at the first stop
    clobbered: tuple[Clobber, ...]  # payload segments (initrd, dtb) changed between the stops
    by_design: tuple[Clobber, ...]  # the zImage's own segment, overwritten by the kernel on purpose
    footprint: dict = field(default_factory=dict)
    kernel_log: tuple[str, ...] = ()
    dumps: str = ""
    hang: dict = field(default_factory=dict)  # post-mortem when a stop never came (see Observer._post_mortem)

    @property
    def intact(self) -> bool:
        return not self.clobbered and all(s.reached for s in self.stops)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["clobbered"] = [asdict(c) | {"label": c.label} for c in self.clobbered]
        d["by_design"] = [asdict(c) | {"label": c.label} for c in self.by_design]
        return d


# --- pure helpers ------------------------------------------------------------------------------------------
def diff_ranges(old: bytes, new: bytes, coalesce: int = COALESCE) -> list[tuple[int, int]]:
    """Byte ranges [start, end) where `new` differs from `old` (same length), runs closer than `coalesce`
    merged. XOR of two big integers is C-speed, and a regex finds the non-zero runs."""
    n = min(len(old), len(new))
    if old[:n] == new[:n]:
        return []
    x = (int.from_bytes(old[:n], "big") ^ int.from_bytes(new[:n], "big")).to_bytes(n, "big")
    out: list[tuple[int, int]] = []
    for m in re.finditer(rb"[^\x00]+", x):
        if out and m.start() - out[-1][1] < coalesce:
            out[-1] = (out[-1][0], m.end())
        else:
            out.append((m.start(), m.end()))
    return out


def segment_changes(first: dict[SegmentSpec, bytes],
                    second: dict[SegmentSpec, bytes]) -> dict[SegmentSpec, list[tuple[int, int]]]:
    """Each segment's changed byte ranges between two dumps: computed once, read by every consumer."""
    return {seg: diff_ranges(first[seg], second[seg]) for seg in first}


def load_fidelity(first: dict[SegmentSpec, bytes]) -> tuple[list[str], set[SegmentSpec]]:
    """Kernel and initrd segments at the first stop against the files they were loaded from: the problems,
    and the segments that hold exactly their file."""
    problems, as_loaded = [], set()
    for seg, data in first.items():
        if seg.source is None or seg.role not in ("kernel", "initrd"):
            continue
        want = seg.source.read_bytes()[:seg.size]
        bad = diff_ranges(want, data)
        if len(want) != seg.size:
            problems.append(f"{seg.role} segment is {seg.size:#x} bytes, the file {len(want):#x}")
        if bad:
            problems.append(f"{seg.role} segment differs from {seg.source.name} at load: first at "
                            f"+{bad[0][0]:#x}, {len(bad)} ranges")
        elif len(want) == len(data):
            as_loaded.add(seg)
    return problems, as_loaded


def keep_evidence(out: Path, second: dict[SegmentSpec, bytes], changes: dict[SegmentSpec, list[tuple[int, int]]],
                  as_loaded: set[SegmentSpec]) -> list[dict]:
    """Drop the dumps that repeat a file already in the case dir (a stop-1 dump of a segment `as_loaded`, a
    stop-2 dump without `changes`), and list what each stop held in dumps.json: a matrix of 100 MB initrds
    wrote ~8 GB per run when every dump was kept."""
    listing = []
    for seg, changed in changes.items():
        stop1, stop2 = f"stop1-{seg.role}-{seg.start:08x}.bin", f"stop2-{seg.role}-{seg.start:08x}.bin"
        entry: dict = {"segment": seg.role, "start": seg.start, "size": seg.size, "stop1": stop1}
        if seg in as_loaded:
            (out / stop1).unlink()
            entry["stop1"] = f"not kept: equal to {seg.source} as loaded"
        if not changed:
            (out / stop2).unlink()
            entry["stop2"] = "not kept: equal to stop 1"
        elif seg.size > KEEP_WHOLE and len(changed) <= MAX_PIECES:
            (out / stop2).unlink()
            pieces = []
            for s, e in changed:
                piece = f"stop2-{seg.role}-{seg.start:08x}-changed-{seg.start + s:08x}-{seg.start + e:08x}.bin"
                (out / piece).write_bytes(second[seg][s:e])
                pieces.append(piece)
            entry["stop2"] = pieces
        else:
            entry["stop2"] = stop2
        listing.append(entry)
    (out / "dumps.json").write_text(json.dumps(listing, indent=1) + "\n")
    return listing


def free_window(lo: int, hi: int, taken: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """[lo, hi) minus the taken ranges."""
    out, cur = [], lo
    for s, e in sorted(taken):
        if e <= cur or s >= hi:
            continue
        if s > cur:
            out.append((cur, s))
        cur = max(cur, e)
    if cur < hi:
        out.append((cur, hi))
    return out


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


def pattern_writes(window: bytes, window_start: int, gaps: list[tuple[int, int]],
                   coalesce: int = HANG_COALESCE) -> list[tuple[int, int]]:
    """Absolute ranges of the filled gaps (inside a dump of the window starting at `window_start`) that no
    longer hold the pattern: what the guest wrote since the fill."""
    out: list[tuple[int, int]] = []
    for s, e in gaps:
        n = (e - s) // 4 * 4
        got = window[s - window_start:s - window_start + n]
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
    while start > 0 and _printable(text[start - 1:start]):
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


def output_progress(regions: tuple[tuple[str, int, int], ...], writes: list[tuple[int, int]]) -> dict:
    """How far the decompressed kernel got: the highest written byte inside the layout's `kernel` region.
    The decompressor writes its output in one pass, low to high, straight to its final place."""
    kernel = next(((s, e) for name, s, e in regions if name == "kernel"), None)
    if kernel is None:
        return {}
    inside = [min(e, kernel[1]) for s, e in writes if s < kernel[1] and kernel[0] < e]
    return {"output_start": kernel[0], "output_size": kernel[1] - kernel[0],
            "output_end": max(inside) if inside else None}


def hang_reasons(hang: dict, plan: Plan) -> list[str]:
    """One line per finding of a post-mortem, most decisive first."""
    phase = hang["phase"]
    target = f"kernel entry {plan.kernel_entry:#x}" if phase == "decompress" else f"zImage entry {plan.entry:#x}"
    head = f"the {target} never came within the {phase} deadline ({hang['deadline']:.0f} s)"
    pc = hang.get("pc")
    if pc is None:
        return [head + (f"; {hang['error']}" if "error" in hang else "")]
    if hang.get("found_by") == "halt check":
        head += (f": {hang['waited']:.1f} s after the zImage entry the CPU spins in a branch-to-self at {pc:#x} "
                 "with IRQ and FIQ masked, so it never will")
    else:
        head += f"; halted after {hang['waited']:.1f} s at PC {pc:#x} (instruction {hang['insn']})"
        if hang.get("halted_for_good"):
            head += ", a branch-to-self with IRQ and FIQ masked: it never would have"
    reasons = [head]
    if hang.get("where") or hang.get("zimage_offset") is not None:
        where = " and ".join(hang.get("where") or []) or "no region of the layout"
        offset = f" = zImage file offset {hang['zimage_offset']:#x}" if hang.get("zimage_offset") is not None else ""
        reasons.append(f"PC {pc:#x} lies in {where}{offset}")
    # A register just past a message and not at the start of the next string is the strong clue: a print
    # loop walked over the message (the Debian zImage's error() leaves r0 so). Strings sit back to back in
    # .rodata, so a base pointer at one string is also "just past" the one before: those are ambiguous and
    # quoted only when there is no strong clue (result.json has them all).
    strings = hang.get("strings") or {}
    strong = [f"{reg} points just past the message {k['past']!r} (as a print loop leaves its pointer)"
              for reg, k in strings.items() if "past" in k and "at" not in k]
    weak = [f"{reg} points at the string {k['at']!r}" if "at" in k else f"{reg} points just past {k['past']!r}"
            for reg, k in strings.items()]
    reasons += strong or weak
    if hang.get("output_size"):
        end, start, size = hang.get("output_end"), hang["output_start"], hang["output_size"]
        if end is None:
            reasons.append(f"the decompressed kernel [{start:#x}, {start + size:#x}) was not written at all")
        else:
            done = end - start
            reasons.append(f"the decompressed kernel was written up to {end:#x}: {done:#x} of {size:#x} bytes "
                           f"({100 * done // size}%)" + ("" if done < size else ", i.e. all of it"))
    if "error" in hang:
        reasons.append(hang["error"])
    return reasons


def make_plan(log: KexecLog, zimage: ZImage, ram: tuple[int, int], prediction: dict | None,
              files: dict[str, Path], bootargs: str | None) -> Plan:
    """Where to stop and what to dump, from the parsed load plan."""
    if zimage.text_offset is not None:
        to, source = zimage.text_offset, "zImage tag"
    else:
        to, source = 0x8000, "oracle assumption (kexec-tools' 0x8000; the zImage does not say)"
    load = log.kernel.address if log.kernel else log.entry
    entry = log.entry if log.entry is not None else load
    assert load is not None and entry is not None
    kentry = kernel_address(load, to, (ram,))
    roles = {}
    for role, placed in (("kernel", log.kernel), ("initrd", log.initrd), ("dtb", log.dtb)):
        if placed is not None:
            roles[placed.address] = role
    segments = []
    for seg in log.segments:
        if seg.mem is None or not seg.bufsz:
            continue
        role = roles.get(seg.mem, "kernel" if seg.mem == load else "other")
        size = seg.bufsz
        if role == "kernel":
            size = min(size, zimage.size)  # kexec >= 2.0.22 zeroes the 4 bytes past _edata
        segments.append(SegmentSpec(role, seg.mem, size, files.get(role)))
    footprint_hi = None
    if prediction:
        written = [r["end"] for r in prediction.get("layout", []) if r.get("role") == "written"]
        footprint_hi = max(written) if written else None
    kseg = next((s for s in segments if s.role == "kernel"), None)
    fill = None
    if kseg is not None:
        lo = (kseg.start + kseg.size + 0xFFF) & ~0xFFF
        if zimage.inflated_size and kentry <= lo < kentry + zimage.inflated_size:
            # The decompressed kernel's text+data is rewritten by design: filling it would cost seconds of
            # gdb writes (the window's bulk) for nothing. The highest write lies above it.
            lo = max(lo, (kentry + zimage.inflated_size) & ~0xFFF)
        hi = min(ram[1], (footprint_hi + FILL_ABOVE_FOOTPRINT) if footprint_hi else lo + FILL_DEFAULT)
        fill = (lo, hi)
    dtb = log.dtb.address if log.dtb else None
    regions = tuple((r["name"], r["start"], r["end"]) for r in (prediction or {}).get("layout", [])
                    if r.get("role") != "ram")
    return Plan(entry, kentry, to, source, dtb, tuple(segments), fill, bootargs, regions, ram)


def fdtget(path: Path, *args: str) -> str | None:
    """`fdtget` on the DTB at `path` (options may follow the file: getopt permutes them): its output, or
    None when the node or property is not there."""
    run = subprocess.run(["fdtget", str(path), *args], capture_output=True, text=True)
    return run.stdout.strip() if run.returncode == 0 else None


def dtb_problems(path: Path, initrd: SegmentSpec | None, bootargs: str | None) -> list[str]:
    """Does the DTB kexec loaded say what the load plan says?"""
    problems = []
    if initrd is not None:
        for prop, want in (("linux,initrd-start", initrd.start), ("linux,initrd-end", initrd.start + initrd.size)):
            raw = fdtget(path, "-t", "x", "/chosen", prop)
            words = [int(w, 16) for w in raw.split()] if raw else []
            got = (words[0] << 32 | words[1]) if len(words) == 2 else (words[0] if words else None)
            if got != want:
                problems.append(f"DTB /chosen/{prop} = {got if got is None else hex(got)}, plan says {want:#x}")
    if bootargs is not None:
        got_args = fdtget(path, "-t", "s", "/chosen", "bootargs")
        if (got_args or "").strip() != bootargs.strip():
            problems.append(f"DTB /chosen/bootargs = {got_args!r}, plan says {bootargs!r}")
    return problems


def kernel_log_lines(data: bytes) -> tuple[str, ...]:
    seen: list[str] = []
    for m in re.finditer(LOG_PATTERNS, data):
        # The kernel's .rodata holds the same words as printk formats; a format has a '%' before its NUL
        # (often on a later line), a log record has none.
        tail = data[m.start():m.start() + 256].split(b"\0", 1)[0]
        line = m.group(0).decode(errors="replace").strip()
        if b"%" not in tail and line not in seen:
            seen.append(line)
    return tuple(seen[:12])


# --- the live part -----------------------------------------------------------------------------------------
class Observer:
    """Owns the gdbstub connection for one kexec -e. `arm()` before kexec -e, `observe()` after it."""

    def __init__(self, gdb_socket: Path, pmemsave: Callable[[int, int, Path], None], plan: Plan, out: Path,
                 deadlines: dict[str, float] | None = None, spin_check: bool = True):
        self.plan = plan
        self.out = out
        self.pmemsave = pmemsave
        self.gdb = GdbStub(gdb_socket)
        self.entry_break = True
        self.deadlines = STOP_DEADLINES | (deadlines or {})  # seconds, before TESTBENCH_TIMEOUT_FACTOR
        self.spin_check = spin_check  # False: only the deadline ends a wait for the kernel entry

    def arm(self) -> None:
        """Attach (the VM stops), set both breakpoints, and let stage 1 run on to take `kexec -e`."""
        self.out.mkdir(parents=True, exist_ok=True)
        self.gdb.connect()
        self.gdb.set_hw_break(self.plan.entry)
        if self.plan.kernel_entry != self.plan.entry:
            self.gdb.set_hw_break(self.plan.kernel_entry)
        self.gdb.cont()

    def arm_at_entry(self, registers: dict[str, int], writes: dict[int, bytes]) -> Stop:
        """Replay: the VM is paused before its first instruction. Write `writes` into RAM, set the boot
        registers and only the kernel breakpoint; the paused state itself is the first stop."""
        self.out.mkdir(parents=True, exist_ok=True)
        self.entry_break = False
        self.gdb.connect()
        for address, data in writes.items():
            self.gdb.write_memory(address, data)
        for name, value in registers.items():
            self.gdb.write_register(name, value)
        self.gdb.set_hw_break(self.plan.kernel_entry)
        regs = self.gdb.registers()
        return Stop(0, regs[15], regs, time.monotonic())

    def close(self) -> None:
        self.gdb.close()

    def _dump(self, start: int, size: int, name: str) -> bytes:
        path = self.out / name
        self.pmemsave(start, size, path)
        data = path.read_bytes()
        return data

    def _check_stop(self, name: str, expected: int, stop: Stop | None, seconds: float | None) -> StopReport:
        if stop is None:
            return StopReport(name, expected, False, seconds)
        problems = []
        if stop.pc != expected:
            problems.append(f"{name} stop: PC {stop.pc:#x}, expected {expected:#x}")
        r2 = stop.regs[2]
        if self.plan.dtb is not None and r2 != self.plan.dtb:
            problems.append(f"{name} stop: r2 {r2:#x} is not the DTB segment {self.plan.dtb:#x}")
        sctlr = self.gdb.read_register("SCTLR")
        # SCTLR from QEMU's system-register XML; without it, a PC equal to a physical RAM address
        # (the breakpoint hit at all) is the evidence that VA == PA, i.e. the MMU is off.
        mmu_off = (sctlr & SCTLR_M) == 0 if sctlr is not None else stop.pc == expected
        if not mmu_off:
            problems.append(f"{name} stop: MMU is on (SCTLR {sctlr:#x})")
        return StopReport(name, expected, True, seconds, stop.pc, r2, sctlr, mmu_off, tuple(problems))

    def _dump_segments(self, tag: str) -> dict[SegmentSpec, bytes]:
        return {s: self._dump(s.start, s.size, f"{tag}-{s.role}-{s.start:08x}.bin") for s in self.plan.segments}

    def _fidelity(self, first: dict[SegmentSpec, bytes]) -> tuple[list[str], set[SegmentSpec]]:
        problems, as_loaded = load_fidelity(first)
        for seg, data in first.items():
            if seg.role == "dtb":
                (self.out / "dtb-as-loaded.dtb").write_bytes(data)
                initrd = next((s for s in self.plan.segments if s.role == "initrd"), None)
                problems += dtb_problems(self.out / "dtb-as-loaded.dtb", initrd, self.plan.bootargs)
        return problems, as_loaded

    def _fill(self) -> list[tuple[int, int]]:
        if self.plan.fill is None:
            return []
        taken = [(s.start, s.start + s.size) for s in self.plan.segments]
        gaps = free_window(*self.plan.fill, taken)
        for s, e in gaps:
            self.gdb.write_memory(s, PATTERN * ((e - s) // 4))
        return gaps

    def observe(self, exec_at: float, first: Stop | None = None) -> Observation:
        """Wait for both stops (the VM is running kexec -e), dump, diff, and leave the VM running."""
        factor = timeout_factor()
        handoff = self.deadlines["handoff"] * factor
        stop1 = first or self.gdb.wait_stop(handoff)
        report1 = self._check_stop("zimage", self.plan.entry, stop1, stop1.at - exec_at if stop1 else None)
        if stop1 is None:
            return self._hung("handoff", (report1,), (), [], None, time.monotonic() - exec_at, handoff)
        first = self._dump_segments("stop1")
        fidelity, as_loaded = self._fidelity(first)
        gaps = self._fill()
        if self.entry_break:
            self.gdb.remove_hw_break(self.plan.entry)  # or the CPU stops here again at once
            if self.plan.kernel_entry == self.plan.entry:
                # TEXT_OFFSET 0x8000: the kernel is entered where the zImage was. Step off the address
                # first, then arm it again for the second stop.
                if self.gdb.step() is None:
                    raise GdbError(f"single step from the zImage entry {self.plan.entry:#x} did not stop")
                self.gdb.set_hw_break(self.plan.kernel_entry)
        resumed = time.monotonic()
        self.gdb.cont()
        decompress = self.deadlines["decompress"] * factor
        stop2, halted = self._wait_kernel_entry(decompress)
        report2 = self._check_stop("kernel", self.plan.kernel_entry, stop2,
                                   stop2.at - resumed if stop2 else None)
        if stop2 is None:
            waited = (halted.at if halted else time.monotonic()) - resumed
            return self._hung("decompress", (report1, report2), tuple(fidelity), gaps, first, waited, decompress,
                              halted)
        second = self._dump_segments("stop2")
        changes = segment_changes(first, second)
        clobbered, by_design = self._clobbers(changes)
        footprint = self._footprint(gaps, changes)
        keep_evidence(self.out, second, changes, as_loaded)
        if self.plan.kernel_entry != self.plan.entry:
            self.gdb.remove_hw_break(self.plan.kernel_entry)
        self.gdb.detach()
        return Observation("kernel", (report1, report2), tuple(fidelity), clobbered, by_design, footprint,
                           dumps=str(self.out))

    def _wait_kernel_entry(self, timeout: float) -> tuple[Stop | None, Stop | None]:
        """(the breakpoint stop, None), or (None, the sample that proved the CPU halted for good), or
        (None, None) at the deadline. Every SPIN_SAMPLE seconds the VM is interrupted for a few packets to
        look at the PC; a `b .` with interrupts masked (the decompressor's error() ends in one) is final."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            stop = self.gdb.wait_stop(min(remaining, SPIN_SAMPLE) if self.spin_check else remaining)
            if stop is not None:
                return stop, None
            if not self.spin_check:
                continue
            sample = self.gdb.interrupt()
            if sample is None:
                raise GdbError("the VM did not stop when interrupted")
            if sample.pc == self.plan.kernel_entry:
                return sample, None  # the breakpoint fired as we interrupted: its stop reply came first
            if halted_for_good(self.gdb.read_memory(sample.pc & ~1, 4), self.gdb.read_register("cpsr")):
                return None, sample
            self.gdb.cont()
        return None, None

    def _clobbers(self, changes: dict[SegmentSpec, list[tuple[int, int]]]
                  ) -> tuple[tuple[Clobber, ...], tuple[Clobber, ...]]:
        clobbered, by_design = [], []
        for seg, changed in changes.items():
            for s, e in changed:
                c = Clobber(seg.role, seg.start + s, seg.start + e, s, e)
                (by_design if seg.role == "kernel" else clobbered).append(c)
        return tuple(clobbered), tuple(by_design)

    def _footprint(self, gaps: list[tuple[int, int]], changes: dict[SegmentSpec, list[tuple[int, int]]]) -> dict:
        """The highest byte the decompressor changed: pattern gaps and segments together."""
        highest = None
        for s, e in gaps:
            data = self._dump(s, e - s, f"fill-{s:08x}.bin")
            changed = diff_ranges(PATTERN * ((e - s) // 4), data)
            if changed:
                highest = max(highest or 0, s + changed[-1][1])
            (self.out / f"fill-{s:08x}.bin").unlink()  # only the changed ranges matter; keep disk small
        for seg, changed in changes.items():
            if changed:
                highest = max(highest or 0, seg.start + changed[-1][1])
        top = self.plan.fill[1] if self.plan.fill else None
        return {"highest_written_end": highest, "window": list(self.plan.fill) if self.plan.fill else None,
                "reached_window_top": highest is not None and top is not None and highest >= top - COALESCE}

    def _hung(self, phase: str, stops: tuple[StopReport, ...], fidelity: tuple[str, ...],
              gaps: list[tuple[int, int]], first: dict[SegmentSpec, bytes] | None, waited: float,
              deadline: float, halted: Stop | None = None) -> Observation:
        """The stop never came: halt the VM (unless a sample already did), dump the segments and the RAM after
        them, quote any log lines and write the post-mortem."""
        clobbered: tuple[Clobber, ...] = ()
        by_design: tuple[Clobber, ...] = ()
        lines: tuple[str, ...] = ()
        hang: dict = {"phase": phase, "deadline": round(deadline, 1), "waited": round(waited, 3),
                      "found_by": "deadline" if halted is None else "halt check"}
        try:
            if halted is None:
                halted = self.gdb.interrupt()
            now = self._dump_segments(f"hung-{phase}")
            if first is not None:
                clobbered, by_design = self._clobbers(segment_changes(first, now))
            window = None
            if self.plan.fill is not None:
                window = self._dump(self.plan.fill[0], self.plan.fill[1] - self.plan.fill[0], f"hung-{phase}-ram.bin")
                lines = kernel_log_lines(window)
            hang |= self._post_mortem(halted, window, gaps, by_design)
            self.gdb.detach()
        except GdbError as err:
            hang["error"] = f"post-mortem incomplete: {err}"
        hang["reasons"] = hang_reasons(hang, self.plan)
        return Observation(phase, stops, fidelity, clobbered, by_design, {}, lines, str(self.out), hang)

    def _post_mortem(self, halted: Stop | None, window: bytes | None, gaps: list[tuple[int, int]],
                     by_design: tuple[Clobber, ...]) -> dict:
        """Where the CPU is and what it wrote, for a reader without symbols (see the module docstring)."""
        if halted is None:
            return {"error": "the VM did not stop when interrupted"}
        pc = halted.pc
        cpsr = self.gdb.read_register("cpsr")
        sctlr = self.gdb.read_register("SCTLR")
        code = self.gdb.read_memory(pc & ~1, 4)
        info: dict = {"pc": pc, "cpsr": cpsr, "registers": list(halted.regs), "insn": code[::-1].hex(),
                      "halted_for_good": halted_for_good(code, cpsr)}
        if window is not None and self.plan.fill is not None:
            writes = pattern_writes(window, self.plan.fill[0], gaps)
            info["written"] = [{"start": s, "end": e, "regions": regions_at(self.plan.regions, s, e)}
                               for s, e in writes]
            info |= output_progress(self.plan.regions, writes + [(c.start, c.end) for c in by_design])
        if sctlr is not None and sctlr & SCTLR_M and not any(s <= pc < e for _, s, e in self.plan.regions):
            # The MMU is on and the PC is no physical address we know: the first kernel or purgatory, where
            # addresses are virtual. Nothing below would mean anything.
            info["mmu_on"] = True
            return info
        info["where"] = regions_at(self.plan.regions, pc, pc + 1)
        kseg = next((s for s in self.plan.segments if s.role == "kernel" and s.source is not None), None)
        if kseg is not None and kseg.source is not None:
            around = self.gdb.read_memory((pc & ~3) - 32, 64)
            found = locate_in(kseg.source.read_bytes(), around)
            info["zimage_offset"] = None if found is None else found + 32 + (pc & 3)
        info["strings"] = self._register_strings(halted.regs)
        return info

    def _register_strings(self, regs: tuple[int, ...]) -> dict[str, dict[str, str]]:
        """Messages r0-r12 point at, or point just past. RAM only: reading a device register through the
        gdbstub can pop a FIFO."""
        found: dict[str, dict[str, str]] = {}
        lo, hi = self.plan.ram or (0, 0)
        for i, value in enumerate(regs[:13]):
            if not lo + STRING_PROBE <= value < hi - STRING_PROBE:
                continue
            try:
                data = self.gdb.read_memory(value - STRING_PROBE, 2 * STRING_PROBE)
            except GdbError:
                continue
            kinds = {"past": string_before(data[:STRING_PROBE]), "at": string_at(data[STRING_PROBE:])}
            if any(kinds.values()):
                found[f"r{i}"] = {k: v for k, v in kinds.items() if v}
        return found
