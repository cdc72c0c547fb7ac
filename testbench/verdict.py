"""From what the console showed after `kexec -e` to a verdict: pass / fail / error, a phase and reasons.

Phases, in order: boot1 (stage-1 boot), load (kexec -l), handoff (kexec -e to zImage entry), decompress
(zImage entry to kernel entry), kernel (kernel entry to stage-2 init), init (stage-2 init to the marker).
The phase of a failure is the phase that was entered and never completed. Without the gdbstub stops the
console cannot tell handoff from decompress: silence after "Bye!" is reported as `handoff`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace

from .cpus import handoff_cpu_reasons, smp_sign_reasons, stage2_cpu_problems
from .observe.observation import Observation
from .oracle import Collision, Prediction
from .oracle.placement_check import PlacementCheck
from .payload_check import parse_spec

# How far a case (or a replay) goes: to stage 2's init, or to the kernel entry (a layout verdict only).
UNTIL = ("init", "kernel-entry")

# Console lines that prove a phase was entered.
PROGRESS = (
    ("handoff", r"Bye!"),
    ("kernel", r"Booting Linux on physical CPU"),
    ("init", r"Run /init as init process|TESTBENCH-STAGE2-INIT"),
)

# Ends at the newline, not `$`: the console is matched while it streams in (see guest.Shell).
STAGE2_MARKER = r"^TESTBENCH-STAGE2 (\{.*\})\n"


@dataclass(frozen=True)
class Signature:
    phase: str
    pattern: str
    reason: str  # may use {0} for the whole match, {1}... for groups


# Failure signatures after kexec -e. Each names what was most likely damaged, for the reader of the report.
SIGNATURES = (
    Signature("kernel", r"Error: invalid dtb[^\n]*", "DTB clobbered or not passed: the kernel says '{0}'"),
    Signature(
        "kernel",
        r"INITRD: (0x[0-9a-f]+\+0x[0-9a-f]+) overlaps in-use memory region",
        "initrd overlaps the kernel ({1}): the kernel disabled the initrd",
    ),
    # "write error" is the rootfs running out of memory while unpacking: too little RAM, not a clobber.
    Signature(
        "kernel",
        r"Initramfs unpacking failed: write error",
        "initramfs did not fit in RAM (Initramfs unpacking failed: write error): RAM too small for this initrd",
    ),
    Signature(
        "kernel",
        r"Initramfs unpacking failed: (?!write error)([^\n]*)",
        "initrd clobbered: Initramfs unpacking failed: {1}",
    ),
    Signature("kernel", r"Unable to handle kernel [^\n]*", "kernel oops: {0}"),
    Signature("kernel", r"Kernel panic - not syncing: ([^\n]*)", "Kernel panic: {1}"),
    Signature("kernel", r"No working init found", "no init in the initrd: the initrd was lost or clobbered"),
)


@dataclass(frozen=True)
class Stage2:
    cmdline: str
    iomem_ram: tuple[str, ...]
    fdt_sha256: str
    payload_sha256: str  # the digest `payload_check` names (payload_check.py): the whole file or a sample
    payload_size: int | None
    payload_check: str = "full"
    uptime: float | None = None  # the second kernel's /proc/uptime when its init started...
    uptime_end: float | None = None  # ...and when it printed the marker
    cpus_online: str | None = None  # the CPUs it brought up, as /sys/devices/system/cpu/online lists them
    cpus_possible: str | None = None

    def to_dict(self) -> dict:
        return {
            "cmdline": self.cmdline,
            "iomem_ram": list(self.iomem_ram),
            "fdt_sha256": self.fdt_sha256,
            "payload_sha256": self.payload_sha256,
            "payload_size": self.payload_size,
            "payload_check": self.payload_check,
            "uptime": self.uptime,
            "uptime_end": self.uptime_end,
            "cpus_online": self.cpus_online,
            "cpus_possible": self.cpus_possible,
        }


@dataclass(frozen=True)
class Verdict:
    verdict: str  # pass | fail | error
    phase: str
    reasons: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        return {"verdict": self.verdict, "phase": self.phase, "reasons": list(self.reasons)}


def parse_stage2(text: str) -> Stage2 | None:
    match = re.search(STAGE2_MARKER, text, re.MULTILINE)
    if match is None:
        return None
    try:
        data = json.loads(match.group(1))
    except json.JSONDecodeError:
        return None
    return Stage2(
        cmdline=data.get("cmdline", ""),
        iomem_ram=tuple(data.get("iomem_ram", ())),
        fdt_sha256=data.get("fdt_sha256", ""),
        payload_sha256=data.get("payload_sha256", ""),
        payload_size=data.get("payload_size"),
        payload_check=data.get("payload_check") or "full",
        uptime=_number(data.get("uptime")),
        uptime_end=_number(data.get("uptime_end")),
        cpus_online=data.get("cpus_online") or None,
        cpus_possible=data.get("cpus_possible") or None,
    )


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def phase_reached(after_exec: str) -> str:
    phase = "handoff"
    for name, pattern in PROGRESS:
        if re.search(pattern, after_exec):
            phase = name
    return phase


def signature_reasons(after_exec: str) -> list[str]:
    reasons = []
    for signature in SIGNATURES:
        for match in re.finditer(signature.pattern, after_exec):
            reasons.append(signature.reason.format(match.group(0), *match.groups()))
            break
    return reasons


def judge_stage2(
    after_exec: str,
    expected_cmdline: str,
    expected_payload_sha256: str | None,
    ended_by: str,
    expected_fdt_sha256: str | None = None,
    expected_cpus: int | None = None,
) -> Verdict:
    """Judge the console text that followed `kexec -e`.

    `ended_by` says why we stopped reading: "marker", "exit" (QEMU exited: panic=-1 with -no-reboot, or
    poweroff), "silence" (nothing new for the silence window) or "timeout". `expected_fdt_sha256`, when the
    bench knows the exact DTB bytes it handed over (replay), must match /sys/firmware/fdt in stage 2;
    `expected_cpus` (the case's --smp) is how many CPUs stage 2 must have online.
    """
    stage2 = parse_stage2(after_exec)
    phase = phase_reached(after_exec)
    reasons = signature_reasons(after_exec) + smp_sign_reasons(after_exec)
    if stage2 is not None:
        problems = []
        if stage2.cmdline.strip() != expected_cmdline.strip():
            problems.append(f"command line differs: got {stage2.cmdline!r}, requested {expected_cmdline!r}")
        if expected_payload_sha256 is not None and stage2.payload_sha256 != expected_payload_sha256:
            check = parse_spec(stage2.payload_check)
            problems.append(
                f"initrd payload ({check.describe()}) {stage2.payload_sha256 or 'missing'} != "
                f"host {expected_payload_sha256}: the payload the second kernel sees is not the one loaded"
            )
        if expected_fdt_sha256 is not None and stage2.fdt_sha256 != expected_fdt_sha256:
            problems.append(
                f"DTB sha256 {stage2.fdt_sha256 or 'missing'} != {expected_fdt_sha256} of the DTB "
                "loaded: the DTB the second kernel sees is not the one handed over"
            )
        if expected_cpus is not None:
            problems += stage2_cpu_problems(stage2.cpus_online, stage2.cpus_possible, expected_cpus)
        if problems:
            return Verdict("fail", "init", tuple(problems + reasons))
        dtb = ", DTB" if expected_fdt_sha256 is not None else ""
        return Verdict("pass", "init", (f"stage-2 init reached; initrd payload{dtb} and command line intact",))
    if phase == "handoff":
        reasons += handoff_cpu_reasons(after_exec)
    if not reasons:
        if phase == "handoff" and "Bye!" in after_exec:
            reasons.append(
                "silence after Bye!: the new kernel never printed; the decompressor or the early "
                "kernel hung (typically a clobbered DTB or decompressor)"
            )
        elif phase == "handoff":
            reasons.append("kexec -e did not reach Bye!: the first kernel did not hand over")
        else:
            reasons.append(f"stage 2 stopped in phase {phase} without a known signature ({ended_by})")
    return Verdict("fail", phase, tuple(reasons))


# --- ground truth (observe/) against the oracle and the console --------------------------------------------
# The first clobbered byte the emulator shows may sit above the oracle's first colliding byte by a few bytes:
# a byte written with the value it already had is invisible to a diff. Over random or cpio data 64 equal
# bytes in a row is beyond chance, so a larger gap is a real disagreement.
START_TOLERANCE = 64
PAYLOADS = ("initrd", "dtb")


@dataclass(frozen=True)
class FootprintCheck:
    """Measured highest write vs the oracle's footprint end; the gap is the stack and malloc arena the
    decoder never touched (the oracle counts all of both, which is the safe side)."""

    measured_end: int | None
    predicted_end: int | None
    unused_top: int | None

    def to_dict(self) -> dict:
        return {"measured_end": self.measured_end, "predicted_end": self.predicted_end, "unused_top": self.unused_top}


@dataclass(frozen=True)
class OracleComparison:
    agrees: bool
    differences: tuple[str, ...]
    start_tolerance: int = START_TOLERANCE
    footprint: FootprintCheck | None = None  # None when there was no prediction to compare

    def to_dict(self) -> dict:
        d: dict = {
            "agrees": self.agrees,
            "differences": list(self.differences),
            "start_tolerance": self.start_tolerance,
        }
        if self.footprint is not None:
            d["footprint"] = self.footprint.to_dict()
        return d


def compare_oracle(observed: Observation, predicted: Prediction | None) -> OracleComparison:
    """Does the static oracle say what the emulator saw? Per payload segment (initrd, dtb):

    * a fatal predicted collision must show up as clobbered bytes, and clobbered bytes need a prediction;
    * every clobbered byte must lie inside a predicted collision (fatal or benign) on that segment: the
      oracle's ranges are upper bounds (the whole malloc arena, the whole stack), the diff is exact;
    * the first clobbered byte must be the oracle's first colliding byte, within START_TOLERANCE.
    """
    if predicted is None or predicted.verdict == "unknown":
        why = "no prediction" if predicted is None else "the oracle could not decide (verdict unknown)"
        return OracleComparison(False, (why,))
    diffs = []
    for role in PAYLOADS:
        got = [(c.start, c.end) for c in observed.clobbered if c.segment == role]
        cols = [c for c in predicted.collisions if c.b == role]
        fatal = [c for c in cols if c.severity == "fatal"]
        if fatal and not got:
            diffs.append(
                f"{role}: oracle predicts {fatal[0].a} x {role} [{fatal[0].start:#x}, "
                f"{fatal[0].end:#x}) fatal, the emulator saw it intact"
            )
            continue
        if got and not cols:
            diffs.append(
                f"{role}: emulator saw [{got[0][0]:#x}, {got[-1][1]:#x}) clobbered, the oracle predicts no collision"
            )
            continue
        for s, e in got:
            if not _covered(s, e, cols):
                diffs.append(f"{role}: clobbered [{s:#x}, {e:#x}) lies outside every predicted collision")
        if got and fatal:
            first_pred = min(c.start for c in fatal)
            if not 0 <= got[0][0] - first_pred <= START_TOLERANCE:
                diffs.append(f"{role}: first clobbered byte {got[0][0]:#x}, oracle's first {first_pred:#x}")
    footprint = _footprint(observed, predicted)
    if footprint.measured_end and footprint.predicted_end and footprint.measured_end > footprint.predicted_end:
        diffs.append(
            f"decompressor wrote up to {footprint.measured_end:#x}, above the oracle's footprint "
            f"end {footprint.predicted_end:#x}"
        )
    return OracleComparison(not diffs, tuple(diffs), START_TOLERANCE, footprint)


def _footprint(observed: Observation, predicted: Prediction) -> FootprintCheck:
    measured = observed.footprint.highest_written_end if observed.footprint is not None else None
    written = [r.end for r in predicted.regions if r.role == "written"]
    top = max(written) if written else None
    return FootprintCheck(measured, top, top - measured if top is not None and measured is not None else None)


def _covered(start: int, end: int, cols: list[Collision]) -> bool:
    """[start, end) inside the union of the predicted ranges (adjacent written regions touch)."""
    cur = start
    for c in sorted(cols, key=lambda c: c.start):
        if c.start <= cur < c.end:
            cur = c.end
    return cur >= end


def judge_observation(verdict: Verdict, observed: Observation, agreement: OracleComparison | None) -> Verdict:
    """Fold the emulator's ground truth into the console verdict: a test passes only if every payload
    segment is intact at kernel entry, the stops were clean, and the oracle agreed."""
    reasons: list[str] = []
    phase = verdict.phase
    if observed.phase in ("handoff", "decompress"):
        phase = observed.phase
        where = "zImage entry" if phase == "handoff" else "kernel entry"
        # The post-mortem (observe.postmortem.hang_reasons) says where the CPU really was; the generic line
        # is a fallback.
        reasons += (observed.hang.reasons if observed.hang is not None else ()) or [
            f"the {where} breakpoint never fired: the CPU never left the "
            f"{'old kernel / purgatory' if phase == 'handoff' else 'decompressor'}"
        ]
    for stop in observed.stops:
        reasons += stop.problems
    reasons += [f"load fidelity: {p}" for p in observed.fidelity]
    clobbered = observed.clobbered
    for c in clobbered:
        reasons.append(f"clobbered between zImage entry and kernel entry: {c.label}")
    kernel = observed.stop("kernel")
    if (
        clobbered
        and phase in ("handoff", "kernel")
        and verdict.verdict != "pass"
        and kernel is not None
        and kernel.reached
    ):
        victims = sorted({c.segment for c in clobbered})
        phase = "kernel"
        reasons.append(
            f"phase diagnosis: the kernel was entered (stop 2, r2 = DTB address) with the "
            f"{' and '.join(victims)} already overwritten by the decompressor"
            + ("; without a valid DTB the kernel finds no console and stays silent" if "dtb" in victims else "")
        )
    for line in observed.kernel_log:
        reasons.append(f"kernel log in RAM: {line}")
    if agreement is not None and not agreement.agrees:
        reasons += [f"oracle disagrees with the emulator: {d}" for d in agreement.differences]
    if not reasons:
        return verdict
    return Verdict("fail" if verdict.verdict != "error" else "error", phase, tuple(reasons) + verdict.reasons)


def fold_placement(
    verdict: Verdict, agreement: OracleComparison | None, check: PlacementCheck | None
) -> tuple[Verdict, OracleComparison | None]:
    """kexec's placement against the oracle's rules for that loader: a difference is an oracle
    disagreement like one with the emulator, so the cell fails and says where."""
    if check is None or check.agrees:
        return verdict, agreement
    diffs = tuple(f"placement ({check.family} rules): {d}" for d in check.differences)
    if agreement is None:
        agreement = OracleComparison(False, diffs)
    else:
        agreement = replace(agreement, agrees=False, differences=agreement.differences + diffs)
    reasons = tuple(f"oracle disagrees with kexec: {d}" for d in diffs)
    outcome = "error" if verdict.verdict == "error" else "fail"
    return Verdict(outcome, verdict.phase, verdict.reasons + reasons), agreement
