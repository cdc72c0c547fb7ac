"""The live part of an observation: owns the gdbstub connection for one kexec -e.

After `kexec -l`, attach to QEMU's gdbstub and set two hardware breakpoints, at kexec's entry (the zImage)
and at RAM base + TEXT_OFFSET (the decompressed kernel). At the first stop the segments are dumped with QMP
pmemsave and compared with the files (load fidelity), and the free RAM above the kernel segment is filled
with a pattern. At the second stop the segments are dumped again and diffed: the differing byte ranges are
exactly what the decompressor clobbered; the highest byte of the pattern window that changed is the real
extent of its writes. While gdb holds the VM, gdb owns run/stop: we never send QMP stop/cont in between,
only pmemsave (which works on a stopped VM). When a stop never comes, the VM is halted and examined
(postmortem.py). With several vCPUs the stops, steps, samples and register reads are all on the vCPU
that entered the zImage (the others are offline or parked by then); observe/cpus.json says which one
it was and where the others sat.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..deadlines import STOPS
from ..emulator.console import timeout_factor
from ..emulator.gdbstub import GdbError, GdbStub, Stop
from .dtbprobe import dtb_problems
from .evidence import COALESCE, PATTERN, diff_ranges, keep_evidence, load_fidelity, segment_changes
from .observation import Clobber, Footprint, Observation, StopReport
from .plan import Plan, SegmentSpec, free_window
from .postmortem import (
    STRING_PROBE,
    Hang,
    Written,
    halted_for_good,
    hang_reasons,
    kernel_log_lines,
    locate_in,
    output_progress,
    pattern_writes,
    regions_at,
    string_at,
    string_before,
)

STOP_DEADLINES = STOPS  # deadlines.py
SCTLR_M = 1  # SCTLR bit 0: MMU enable
# While waiting for the kernel entry, look at the PC this often: a CPU halted for good is found in seconds
# instead of at the deadline. Not scaled: it is a sampling period, not a deadline.
SPIN_SAMPLE = 1.0


class Observer:
    """Owns the gdbstub connection for one kexec -e. `arm()` before kexec -e, `observe()` after it."""

    def __init__(
        self,
        gdb_socket: Path,
        pmemsave: Callable[[int, int, Path], None],
        plan: Plan,
        out: Path,
        deadlines: dict[str, float] | None = None,
        spin_check: bool = True,
    ):
        self.plan = plan
        self.out = out
        self.pmemsave = pmemsave
        self.gdb = GdbStub(gdb_socket)
        self.entry_break = True
        self.deadlines = STOP_DEADLINES | (deadlines or {})  # seconds, before TESTBENCH_TIMEOUT_FACTOR
        self.spin_check = spin_check  # False: only the deadline ends a wait for the kernel entry
        self.cpu: int | None = None  # the gdb thread (vCPU) that entered the zImage; None: the stub names none

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
        if stop.thread is not None and self.cpu is not None and stop.thread != self.cpu:
            problems.append(f"{name} stop: vCPU {stop.thread} got there, not vCPU {self.cpu} that entered the zImage")
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
        if stop1 is not None:
            self.cpu = stop1.thread
            self._record_cpus(stop1)
        report1 = self._check_stop("zimage", self.plan.entry, stop1, stop1.at - exec_at if stop1 else None)
        if stop1 is None:
            return self._hung("handoff", (report1,), (), [], None, time.monotonic() - exec_at, handoff)
        dumped = self._dump_segments("stop1")
        fidelity, as_loaded = self._fidelity(dumped)
        gaps = self._fill()
        if self.entry_break:
            self.gdb.remove_hw_break(self.plan.entry)  # or the CPU stops here again at once
            if self.plan.kernel_entry == self.plan.entry:
                # TEXT_OFFSET 0x8000: the kernel is entered where the zImage was. Step off the address
                # first, then arm it again for the second stop.
                if self.gdb.step(thread=self.cpu) is None:
                    raise GdbError(f"single step from the zImage entry {self.plan.entry:#x} did not stop")
                self.gdb.set_hw_break(self.plan.kernel_entry)
        resumed = time.monotonic()
        self.gdb.cont()
        decompress = self.deadlines["decompress"] * factor
        stop2, halted = self._wait_kernel_entry(decompress)
        report2 = self._check_stop("kernel", self.plan.kernel_entry, stop2, stop2.at - resumed if stop2 else None)
        if stop2 is None:
            waited = (halted.at if halted else time.monotonic()) - resumed
            return self._hung(
                "decompress", (report1, report2), tuple(fidelity), gaps, dumped, waited, decompress, halted
            )
        self._record_cpus(stop2, "kernel_entry")
        second = self._dump_segments("stop2")
        changes = segment_changes(dumped, second)
        clobbered, by_design = self._clobbers(changes)
        footprint = self._footprint(gaps, changes)
        keep_evidence(self.out, second, changes, as_loaded)
        if self.plan.kernel_entry != self.plan.entry:
            self.gdb.remove_hw_break(self.plan.kernel_entry)
        self.gdb.detach()
        return Observation(
            "kernel", (report1, report2), tuple(fidelity), clobbered, by_design, footprint, dumps=str(self.out)
        )

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
            sample = self.gdb.interrupt(thread=self.cpu)
            if sample is None:
                raise GdbError("the VM did not stop when interrupted")
            if sample.pc == self.plan.kernel_entry:
                return sample, None  # the breakpoint fired as we interrupted: its stop reply came first
            if halted_for_good(self.gdb.read_memory(sample.pc & ~1, 4), self.gdb.read_register("cpsr")):
                return None, sample
            self.gdb.cont()
        return None, None

    def _record_cpus(self, stop: Stop, name: str = "zimage_entry") -> None:
        """observe/cpus.json: the vCPUs, which one reached each stop, and at the zImage entry where the others
        were (PC and CPSR: offline or parked CPUs sit in firmware, WFI loops or the old kernel's idle)."""
        path = self.out / "cpus.json"
        record = json.loads(path.read_text()) if path.exists() else {}
        record[name] = stop.thread
        if name == "zimage_entry" and stop.thread is not None:
            record["vcpus"] = self.gdb.threads()
            others = {}
            for thread in record["vcpus"]:
                if thread != stop.thread:
                    self.gdb.select(thread)
                    pc, cpsr = self.gdb.registers()[15], self.gdb.read_register("cpsr")
                    others[str(thread)] = {"pc": f"{pc:#x}", "cpsr": None if cpsr is None else f"{cpsr:#x}"}
            self.gdb.select(stop.thread)
            record["others_at_zimage_entry"] = others
        path.write_text(json.dumps(record, indent=1) + "\n")

    def _clobbers(
        self, changes: dict[SegmentSpec, list[tuple[int, int]]]
    ) -> tuple[tuple[Clobber, ...], tuple[Clobber, ...]]:
        clobbered: list[Clobber] = []
        by_design: list[Clobber] = []
        for seg, changed in changes.items():
            for s, e in changed:
                c = Clobber(seg.role, seg.start + s, seg.start + e, s, e)
                (by_design if seg.role == "kernel" else clobbered).append(c)
        return tuple(clobbered), tuple(by_design)

    def _footprint(self, gaps: list[tuple[int, int]], changes: dict[SegmentSpec, list[tuple[int, int]]]) -> Footprint:
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
        return Footprint(highest, self.plan.fill, highest is not None and top is not None and highest >= top - COALESCE)

    def _hung(
        self,
        phase: str,
        stops: tuple[StopReport, ...],
        fidelity: tuple[str, ...],
        gaps: list[tuple[int, int]],
        first: dict[SegmentSpec, bytes] | None,
        waited: float,
        deadline: float,
        halted: Stop | None = None,
    ) -> Observation:
        """The stop never came: halt the VM (unless a sample already did), dump the segments and the RAM after
        them, quote any log lines and write the post-mortem."""
        clobbered: tuple[Clobber, ...] = ()
        by_design: tuple[Clobber, ...] = ()
        lines: tuple[str, ...] = ()
        hang: dict[str, Any] = {
            "phase": phase,
            "deadline": round(deadline, 1),
            "waited": round(waited, 3),
            "found_by": "deadline" if halted is None else "halt check",
        }
        try:
            if halted is None:
                halted = self.gdb.interrupt(thread=self.cpu)
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
        found = Hang(**hang)
        found = replace(found, reasons=tuple(hang_reasons(found, self.plan)))
        return Observation(phase, stops, fidelity, clobbered, by_design, None, lines, str(self.out), found)

    def _post_mortem(
        self, halted: Stop | None, window: bytes | None, gaps: list[tuple[int, int]], by_design: tuple[Clobber, ...]
    ) -> dict[str, Any]:
        """Where the CPU is and what it wrote, for a reader without symbols (see the module docstring)."""
        if halted is None:
            return {"error": "the VM did not stop when interrupted"}
        pc = halted.pc
        cpsr = self.gdb.read_register("cpsr")
        sctlr = self.gdb.read_register("SCTLR")
        code = self.gdb.read_memory(pc & ~1, 4)
        info: dict[str, Any] = {
            "pc": pc,
            "cpsr": cpsr,
            "registers": tuple(halted.regs),
            "insn": code[::-1].hex(),
            "halted_for_good": halted_for_good(code, cpsr),
        }
        if window is not None and self.plan.fill is not None:
            writes = pattern_writes(window, self.plan.fill[0], gaps)
            info["written"] = tuple(Written(s, e, tuple(regions_at(self.plan.regions, s, e))) for s, e in writes)
            info["output"] = output_progress(self.plan.regions, writes + [(c.start, c.end) for c in by_design])
        if sctlr is not None and sctlr & SCTLR_M and not any(s <= pc < e for _, s, e in self.plan.regions):
            # The MMU is on and the PC is no physical address we know: the first kernel or purgatory, where
            # addresses are virtual. Nothing below would mean anything.
            info["mmu_on"] = True
            return info
        info["where"] = tuple(regions_at(self.plan.regions, pc, pc + 1))
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
