"""One kdump cycle after stage 1 is up (DESIGN "Modes"): the crashkernel= reservation checked in
/proc/iomem, `kexec --debug -p`, the crash oracle (oracle/crash.py), the observer's two stops inside the
reservation with the RAM the oracle says is at risk outside it dumped at both, `echo c >
/proc/sysrq-trigger`, and the crash kernel's init judged: command line (with kexec's elfcorehdr= and mem=),
initrd payload, DTB and /proc/vmcore. case.py calls `run_crash` in mode kdump instead of its kexec -l/-e."""

from __future__ import annotations

import hashlib
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from .deadlines import PHASES
from .emulator.console import ConsoleTimeout, timeout_factor
from .emulator.guest import Shell
from .emulator.qemu import QemuProcess
from .errors import BenchError, UserError
from .inputs import kexeclog
from .inputs.crashlog import CrashLog, parse_crash_log
from .kdump_verdict import (
    Vmcore,
    crash_console,
    kdump_sign_reasons,
    merge_writes,
    observed_outside,
    parse_vmcore,
    vmcore_problems,
)
from .observe.observation import Observation
from .observe.observer import Observer
from .observe.plan import Plan, SegmentSpec, make_plan
from .observe.stage2 import CLOBBERED_AT_ENTRY
from .oracle.crash import CrashPrediction, CrashRegion, crash_place, crash_region, elfcorehdr_address, judge_crash
from .oracle.placement import DEFAULT_VERSION, PlacementError, version_family
from .oracle.placement_check import PlacementCheck, check_placement, placement_options
from .prepare import PreparedCase
from .verdict import (
    STAGE2_MARKER,
    OracleComparison,
    Stage2,
    Verdict,
    compare_oracle,
    judge_observation,
    judge_stage2,
    parse_stage2,
)

OUTSIDE = "outside"  # the plan's role for RAM outside the reservation dumped at both stops
ELFCOREHDR = "elfcorehdr"
AT_RISK_MARGIN = 1 << 20  # around each range the oracle says is written outside the reservation
BESIDE_REGION = 8 << 20  # always watched just below and just above the reservation
HALTED = r"Reboot failed -- System halted|reboot: System halted"


@dataclass
class CrashRun:
    """What the crash cycle has gathered so far (case.py copies it into its run, also after an error)."""

    phase: str = "load"
    verdict: Verdict | None = None
    timings: dict[str, float] = field(default_factory=dict)
    kexec_rc: int | None = None
    region: CrashRegion | None = None
    log: kexeclog.KexecLog | None = None
    crash_log: CrashLog | None = None
    crash: CrashPrediction | None = None
    placement: PlacementCheck | None = None
    observation: Observation | None = None
    agreement: OracleComparison | None = None
    stage2: Stage2 | None = None
    vmcore: Vmcore | None = None
    outside_seen: tuple[tuple[int, int], ...] = ()

    def to_dict(self) -> dict:
        """result.json's `kdump`."""
        return {
            "region": [self.region.start, self.region.end] if self.region else None,
            "crash_log": self.crash_log.to_dict() if self.crash_log else None,
            "oracle": self.crash.to_dict() if self.crash else None,
            "outside_writes_observed": [list(r) for r in self.outside_seen],
            "vmcore": self.vmcore.to_dict() if self.vmcore else None,
        }


def _ram(case: PreparedCase) -> tuple[tuple[int, int], ...]:
    m = case.request.machine
    return ((m.ram_base, m.ram_base + case.request.ram),)


def run_crash(
    case: PreparedCase,
    qemu: QemuProcess,
    shell: Shell,
    load_command: str,
    trigger: str,
    loader_version: str | None,
    run: CrashRun,
    say: Callable[[str], None],
) -> None:
    request = case.request
    iomem = (case.share / "iomem.txt").read_text(errors="replace")
    run.region = crash_region(iomem)
    if run.region is None:
        why = shell.run(
            "dmesg | grep -i crashkernel | grep -v 'command line'", PHASES["command"], "dmesg"
        ).output.strip()
        run.phase = "boot1"
        run.verdict = Verdict(
            "fail",
            "boot1",
            (
                f"stage 1 reserved no crash kernel memory for crashkernel={request.crashkernel}: /proc/iomem has "
                "no 'Crash kernel' range",
                *([f"stage 1 said: {why}"] if why else []),
            ),
        )
        return
    say(f"load: kexec --debug -p into the crash region {run.region.label()}")
    mib = (case.inputs["initrd"].size >> 20) + 1
    loaded = shell.run(load_command, PHASES["load_base"] + PHASES["load_per_mib"] * mib, "kexec -p")
    run.timings["load"] = loaded.seconds
    run.kexec_rc = loaded.rc
    text = (case.share / "kexec-debug.txt").read_text(errors="replace")
    run.crash_log = parse_crash_log(text)
    try:
        run.log = kexeclog.parse_kexec_log(text)
    except kexeclog.KexecLogError:
        run.log = None
    version = loader_version or DEFAULT_VERSION
    if run.log is not None:
        _oracle(case, run, version)
    if loaded.rc in (126, 127):
        raise BenchError(f"stage 1 could not run kexec (exit {loaded.rc}): {text.strip()[:200]}")
    if loaded.rc != 0:
        tail = " | ".join(text.strip().splitlines()[-3:])
        refusals = _refusals(case, run, version)
        run.verdict = Verdict("fail", "load", (*refusals, f"kexec -p exited {loaded.rc}: {tail}"))
        return
    if run.log is None or run.crash is None:
        raise BenchError("kexec -p loaded, but its --debug output holds no load plan to judge")
    run.phase = "handoff"  # from the panic on (DESIGN: in kdump, handoff starts at the panic)
    observer = None
    if request.observing:
        observer = Observer(qemu.sockets.gdb, qemu.pmemsave, _plan(case, run), request.out / "observe")
        observer.arm()
    say("handoff: echo c > /proc/sysrq-trigger")
    t_exec = time.monotonic()
    start = shell.send(trigger)
    resumed_at = None
    ended_by = "watch"
    if observer is not None:
        observation = observer.observe(t_exec)
        resumed_at = time.monotonic()
        run.timings["observe"] = resumed_at - t_exec
        for stop in observation.stops:
            if stop.seconds is not None:
                run.timings[f"stop_{stop.name}"] = stop.seconds
        outside = [c for c in observation.clobbered if c.segment == OUTSIDE]
        run.outside_seen = tuple((c.start, c.end) for c in outside)
        # The payload verdict and the oracle comparison see the crash kernel's payloads; the outside
        # windows are judged as their own finding (_judge).
        payloads = tuple(c for c in observation.clobbered if c.segment != OUTSIDE)
        run.observation = replace(observation, clobbered=payloads)
        ended_by = _ended_by(run.observation)
    if ended_by == "watch":
        entered = run.observation is not None and run.observation.phase == "kernel"
        ended_by = _watch(qemu, start, mib, resumed_at, entered)
    run.timings["stage2"] = time.monotonic() - t_exec
    assert qemu.console is not None
    after = crash_console(qemu.console.text[start:])
    run.stage2 = parse_stage2(after)
    run.vmcore = parse_vmcore(after)
    verdict = _judge(case, run, after, ended_by)
    if run.observation is not None:
        agreement = compare_oracle(run.observation, run.crash.prediction)
        predicted = [(w.start, w.end) for w in run.crash.outside]
        unpredicted = [
            r for r in merge_writes(run.outside_seen) if not any(a <= r[0] and r[1] <= b for a, b in predicted)
        ]
        if unpredicted:
            more = tuple(
                f"outside the crash region: emulator wrote [{s:#x}, {e:#x}), not predicted" for s, e, _ in unpredicted
            )
            agreement = replace(agreement, agrees=False, differences=agreement.differences + more)
        run.agreement = agreement
        verdict = judge_observation(verdict, run.observation, run.agreement)
    run.verdict = _fold_placement(verdict, run)


def _watch(qemu: QemuProcess, start: int, mib: int, resumed_at: float | None, entered: bool) -> str:
    """observe.stage2.watch_stage2's wait, also ended by a halt: a crash kernel in 64 MiB panics more often
    than a kexec'd one (out of memory), and on a board without a restart handler panic=-1 halts
    ("Reboot failed -- System halted") with QEMU still running: only the deadline would follow."""
    console = qemu.console
    assert console is not None
    budget = PHASES["stage2_base"] + PHASES["stage2_per_mib"] * mib
    deadline = None if console.no_deadlines else time.monotonic() + budget * timeout_factor()
    silence = PHASES["silence_after_entry" if entered else "silence"] * timeout_factor()
    while True:
        try:
            found = console.wait_for([STAGE2_MARKER, HALTED], 1.0, "stage 2", start, fail_on_close=False)
        except ConsoleTimeout:
            quiet = time.monotonic() - max(console.last_data_at, resumed_at or 0.0)
            if not console.no_deadlines and quiet > silence and "Booting Linux" not in console.text[start:]:
                return "silence"
            if deadline is not None and time.monotonic() > deadline:
                return "timeout"
            continue
        if found is None:
            return "exit"
        return "marker" if found.pattern == STAGE2_MARKER else "halted"


def _oracle(case: PreparedCase, run: CrashRun, version: str) -> None:
    """The crash oracle on kexec's printed plan, and kexec's plan against the oracle's crash rule."""
    assert run.log is not None and run.region is not None and run.crash_log is not None
    request = case.request
    family = case.kexec_family or version_family(version)
    log = run.log
    try:
        run.crash = judge_crash(
            log,
            run.region,
            case.zimage,
            _ram(case),
            kernel_version=case.inputs["kernel"].version,
            kexec_version=version,
            elfcorehdr=run.crash_log.elfcorehdr,
        )
    except UserError as err:
        raise BenchError(f"the crash oracle cannot judge this load: {err}") from None
    # place() from the region's start upwards is kexec -p's fixed-offset rule (oracle/crash.py)
    run.placement = check_placement(
        replace(log, memory_ranges=((run.region.start, 0x1_0000_0000),)), case.zimage, family, request.kexec_args
    )


def _refusals(case: PreparedCase, run: CrashRun, version: str) -> list[str]:
    """Why kexec -p may have failed, from the oracle's crash placement (no log needed)."""
    if run.region is None:
        return []
    try:
        options = placement_options(case.request.kexec_args)
        placed = crash_place(
            run.region,
            case.zimage,
            case.kexec_family or version_family(version),
            image_size=options.get("image_size"),
            initrd_size=case.inputs["initrd"].size,
            dtb_size=run.log.dtb.size if run.log and run.log.dtb else None,
        )
    except PlacementError as err:
        return [f"oracle: {err}"]
    return [f"oracle: {r}" for r in placed.refusals()]


def _expected_cmdline(case: PreparedCase, run: CrashRun) -> str:
    """The command line given plus what kexec appends (elfcorehdr= and mem=, from the oracle's own rule)."""
    assert run.region is not None
    hdr = run.crash_log.elfcorehdr if run.crash_log and run.crash_log.elfcorehdr else (0, 0x1000)
    words = [f"elfcorehdr={hdr[0]:#x}", f"mem={(hdr[0] - run.region.start) >> 10}K"]
    return " ".join([case.request.stage2_cmdline, *words])


def _plan(case: PreparedCase, run: CrashRun) -> Plan:
    """make_plan's stops with the crash kernel's own entry (oracle/crash.py), the pattern fill kept inside
    the reservation (outside it is the crashed kernel's memory, what vmcore must keep), the elfcorehdr named,
    and the RAM at risk outside the reservation dumped at both stops as segments of their own."""
    assert run.log is not None and run.crash is not None and run.region is not None
    region = run.region
    plan = make_plan(
        run.log,
        case.zimage,
        _ram(case)[0],
        run.crash.prediction,
        {"kernel": case.share / "zImage", "initrd": case.share / "initrd.img"},
        _expected_cmdline(case, run),
    )
    hdr = run.crash_log.elfcorehdr if run.crash_log else None
    segments = [
        replace(s, role=ELFCOREHDR) if s.role == "other" and hdr and s.start == hdr[0] else s for s in plan.segments
    ]
    fill = plan.fill
    if fill is not None:
        fill = (max(fill[0], region.start), min(fill[1], region.end))
        fill = fill if fill[1] > fill[0] else None
    ram_lo, ram_hi = _ram(case)[0]
    windows = [(region.start - BESIDE_REGION, region.start), (region.end, region.end + BESIDE_REGION)]
    windows += [(w.start - AT_RISK_MARGIN, w.end + AT_RISK_MARGIN) for w in run.crash.outside]
    for s, e in _merge([(max(s, ram_lo), min(e, ram_hi)) for s, e in windows]):
        for part in _minus_region(s, e, region):
            segments.append(SegmentSpec(OUTSIDE, part[0], part[1] - part[0]))
    return replace(plan, kernel_entry=run.crash.kernel_address, segments=tuple(segments), fill=fill)


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e in sorted(r for r in ranges if r[1] > r[0]):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def _minus_region(s: int, e: int, region: CrashRegion) -> list[tuple[int, int]]:
    return [(a, b) for a, b in ((s, min(e, region.start)), (max(s, region.end), e)) if b > a]


def _ended_by(observation: Observation) -> str:
    if observation.phase in ("handoff", "decompress"):
        return "observed"
    if any(c.segment == "dtb" for c in observation.clobbered):
        return "clobbered"
    return "watch"


def _dtb_sha256(case: PreparedCase) -> str | None:
    """The DTB as kexec loaded it (the observer's stop-1 dump), up to its totalsize: what the crash
    kernel's /sys/firmware/fdt must hold."""
    path = case.request.out / "observe" / "dtb-as-loaded.dtb"
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if len(data) < 8:
        return None
    size = struct.unpack_from(">I", data, 4)[0]
    return hashlib.sha256(data[:size]).hexdigest()


def _judge(case: PreparedCase, run: CrashRun, after: str, ended_by: str) -> Verdict:
    assert run.region is not None and run.crash is not None
    if ended_by == "clobbered":
        return Verdict("fail", "kernel", (CLOBBERED_AT_ENTRY, *run.crash.findings()))
    verdict = judge_stage2(
        after,
        _expected_cmdline(case, run),
        case.payload_sha256,
        ended_by,
        expected_fdt_sha256=_dtb_sha256(case),
        expected_cpus=1,  # maxcpus=1
    )
    problems: list[str] = []
    if case.bootargs_in_dtb:
        problems.append(
            "kexec-tools 2.0.17-2.0.20 take no --command-line on ARM, and kexec -p sets /chosen/bootargs to its "
            "own words alone (elfcorehdr= mem=): a crash kernel loaded by them gets no console= or other word"
        )
    if verdict.verdict == "pass":
        problems += vmcore_problems(run.vmcore, _ram(case), run.region)
    problems += observed_outside(run.outside_seen, [(w.start, w.end) for w in run.crash.outside])
    problems += [r for r in kdump_sign_reasons(after) if r not in verdict.reasons]
    if verdict.verdict == "fail" or problems:
        oracle = [f for f in run.crash.findings() if f not in verdict.reasons]
        return Verdict("fail", verdict.phase, (*problems, *verdict.reasons, *oracle))
    return replace(
        verdict,
        reasons=(
            *verdict.reasons,
            "/proc/vmcore present, ELF core header valid, PT_LOAD "
            "ranges cover the old kernel's RAM outside the reservation",
        ),
    )


def _fold_placement(verdict: Verdict, run: CrashRun) -> Verdict:
    """kexec's crash placement against the oracle's rule, and kexec's appended words against the oracle's."""
    diffs: list[str] = []
    if run.placement is not None and not run.placement.agrees:
        diffs += [f"placement (crash, {run.placement.family} rules): {d}" for d in run.placement.differences]
    if run.crash_log is not None and run.region is not None:
        if run.crash_log.crashkernel not in (None, (run.region.start, run.region.end)):
            diffs.append(f"kexec's crashkernel range {run.crash_log.crashkernel} is not /proc/iomem's")
        hdr = run.crash_log.elfcorehdr
        if hdr is not None:
            want = elfcorehdr_address(run.region, hdr[1])
            if hdr[0] != want:
                diffs.append(f"elfcorehdr: kexec {hdr[0]:#x}, the crash rule {want:#x}")
    if not diffs:
        return verdict
    if run.agreement is not None:
        run.agreement = replace(run.agreement, agrees=False, differences=run.agreement.differences + tuple(diffs))
    outcome = "error" if verdict.verdict == "error" else "fail"
    return Verdict(outcome, verdict.phase, verdict.reasons + tuple(f"oracle disagrees with kexec: {d}" for d in diffs))
