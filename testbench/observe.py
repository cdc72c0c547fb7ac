"""Ground truth from the emulator: stop at the zImage entry and at the kernel entry, dump every segment.

The flow (DOMAIN.md 8.4): after `kexec -l`, attach to QEMU's gdbstub and set two hardware breakpoints,
at kexec's entry (the zImage) and at RAM base + TEXT_OFFSET (the decompressed kernel). At the first stop
the segments are dumped with QMP pmemsave and compared with the files (load fidelity), and the free RAM
above the kernel segment is filled with a pattern. At the second stop the segments are dumped again and
diffed: the differing byte ranges are exactly what the decompressor clobbered; the highest byte of the
pattern window that changed is the real extent of its writes. While gdb holds the VM, gdb owns run/stop:
we never send QMP stop/cont in between, only pmemsave (which works on a stopped VM).
"""

from __future__ import annotations

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
# Kernel log lines worth quoting from a RAM dump after a silent hang.
LOG_PATTERNS = rb"(Error: invalid dtb[^\x00\n]*|Booting Linux[^\x00\n]*|Kernel panic[^\x00\n]*|" \
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
        hi = min(ram[1], (footprint_hi + FILL_ABOVE_FOOTPRINT) if footprint_hi else lo + FILL_DEFAULT)
        fill = (lo, hi)
    dtb = log.dtb.address if log.dtb else None
    return Plan(entry, kentry, to, source, dtb, tuple(segments), fill, bootargs)


def _fdtget(path: Path, node: str, prop: str, kind: str) -> str | None:
    run = subprocess.run(["fdtget", "-t", kind, str(path), node, prop], capture_output=True, text=True)
    return run.stdout.strip() if run.returncode == 0 else None


def dtb_problems(path: Path, initrd: SegmentSpec | None, bootargs: str | None) -> list[str]:
    """Does the DTB kexec loaded say what the load plan says?"""
    problems = []
    if initrd is not None:
        for prop, want in (("linux,initrd-start", initrd.start), ("linux,initrd-end", initrd.start + initrd.size)):
            raw = _fdtget(path, "/chosen", prop, "x")
            words = [int(w, 16) for w in raw.split()] if raw else []
            got = (words[0] << 32 | words[1]) if len(words) == 2 else (words[0] if words else None)
            if got != want:
                problems.append(f"DTB /chosen/{prop} = {got if got is None else hex(got)}, plan says {want:#x}")
    if bootargs is not None:
        got_args = _fdtget(path, "/chosen", "bootargs", "s")
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

    def __init__(self, gdb_socket: Path, pmemsave: Callable[[int, int, Path], None], plan: Plan, out: Path):
        self.plan = plan
        self.out = out
        self.pmemsave = pmemsave
        self.gdb = GdbStub(gdb_socket)
        self.entry_break = True

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

    def _fidelity(self, first: dict[SegmentSpec, bytes]) -> list[str]:
        problems = []
        for seg, data in first.items():
            if seg.role == "dtb":
                (self.out / "dtb-as-loaded.dtb").write_bytes(data)
                initrd = next((s for s in self.plan.segments if s.role == "initrd"), None)
                problems += dtb_problems(self.out / "dtb-as-loaded.dtb", initrd, self.plan.bootargs)
            elif seg.source is not None and seg.role in ("kernel", "initrd"):
                want = seg.source.read_bytes()[:seg.size]
                bad = diff_ranges(want, data)
                if len(want) != seg.size:
                    problems.append(f"{seg.role} segment is {seg.size:#x} bytes, the file {len(want):#x}")
                if bad:
                    problems.append(f"{seg.role} segment differs from {seg.source.name} at load: first at "
                                    f"+{bad[0][0]:#x}, {len(bad)} ranges")
        return problems

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
        stop1 = first or self.gdb.wait_stop(STOP_DEADLINES["handoff"] * factor)
        report1 = self._check_stop("zimage", self.plan.entry, stop1, stop1.at - exec_at if stop1 else None)
        if stop1 is None:
            return self._hung("handoff", (report1,), (), ())
        first = self._dump_segments("stop1")
        fidelity = self._fidelity(first)
        gaps = self._fill()
        if self.entry_break:
            self.gdb.remove_hw_break(self.plan.entry)  # or the CPU stops here again at once
        resumed = time.monotonic()
        self.gdb.cont()
        stop2 = self.gdb.wait_stop(STOP_DEADLINES["decompress"] * factor)
        report2 = self._check_stop("kernel", self.plan.kernel_entry, stop2,
                                   stop2.at - resumed if stop2 else None)
        if stop2 is None:
            return self._hung("decompress", (report1, report2), tuple(fidelity), tuple(gaps), first)
        second = self._dump_segments("stop2")
        clobbered, by_design = self._clobbers(first, second)
        footprint = self._footprint(gaps, first, second)
        if self.plan.kernel_entry != self.plan.entry:
            self.gdb.remove_hw_break(self.plan.kernel_entry)
        self.gdb.detach()
        return Observation("kernel", (report1, report2), tuple(fidelity), clobbered, by_design, footprint,
                           dumps=str(self.out))

    def _clobbers(self, first: dict[SegmentSpec, bytes],
                  second: dict[SegmentSpec, bytes]) -> tuple[tuple[Clobber, ...], tuple[Clobber, ...]]:
        clobbered, by_design = [], []
        for seg in self.plan.segments:
            for s, e in diff_ranges(first[seg], second[seg]):
                c = Clobber(seg.role, seg.start + s, seg.start + e, s, e)
                (by_design if seg.role == "kernel" else clobbered).append(c)
        return tuple(clobbered), tuple(by_design)

    def _footprint(self, gaps: list[tuple[int, int]], first: dict[SegmentSpec, bytes],
                   second: dict[SegmentSpec, bytes]) -> dict:
        """The highest byte the decompressor changed: pattern gaps and segments together."""
        highest = None
        for s, e in gaps:
            data = self._dump(s, e - s, f"fill-{s:08x}.bin")
            changed = diff_ranges(PATTERN * ((e - s) // 4), data)
            if changed:
                highest = max(highest or 0, s + changed[-1][1])
            (self.out / f"fill-{s:08x}.bin").unlink()  # only the changed ranges matter; keep disk small
        for seg in self.plan.segments:
            changed = diff_ranges(first[seg], second[seg])
            if changed:
                highest = max(highest or 0, seg.start + changed[-1][1])
        top = self.plan.fill[1] if self.plan.fill else None
        return {"highest_written_end": highest, "window": list(self.plan.fill) if self.plan.fill else None,
                "reached_window_top": highest is not None and top is not None and highest >= top - COALESCE}

    def _hung(self, phase: str, stops: tuple[StopReport, ...], fidelity: tuple[str, ...],
              gaps: tuple[tuple[int, int], ...], first: dict[SegmentSpec, bytes] | None = None) -> Observation:
        """The stop never came: halt the VM, dump the segments and the RAM after them, quote any log lines."""
        clobbered: tuple[Clobber, ...] = ()
        by_design: tuple[Clobber, ...] = ()
        lines: tuple[str, ...] = ()
        try:
            self.gdb.interrupt()
            now = self._dump_segments(f"hung-{phase}")
            if first is not None:
                clobbered, by_design = self._clobbers(first, now)
            if self.plan.fill is not None:
                lines = kernel_log_lines(self._dump(self.plan.fill[0], self.plan.fill[1] - self.plan.fill[0],
                                                    f"hung-{phase}-ram.bin"))
            self.gdb.detach()
        except GdbError:
            pass
        return Observation(phase, stops, fidelity, clobbered, by_design, {}, lines, str(self.out))
