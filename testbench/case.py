"""One test case, end to end: stage-1 boot, kexec -l, kexec -e, stage 2, verdict, artifacts.

`prepare_case()` (prepare.py) checks every input and writes nothing outside the case dir; `run_case()` drives
QEMU and always returns a CaseResult (a bench failure becomes verdict `error`), with QEMU dead by the time it
returns.
The end of the run (stage-2 watch, oracle against the emulator, verdict) is observe.stage2.finish_run, which
replay shares.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from .cpus import Cpus, load_refusal
from .deadlines import PHASES
from .emulator.console import ConsoleClosed, ConsoleTimeout
from .emulator.guest import Shell
from .emulator.qemu import QemuProcess, qemu_version
from .emulator.snapshot import Slot, SnapshotBroken, claim, wait_restored
from .errors import BenchError, UserError
from .inputs import kexeclog
from .inputs.checks import Input
from .kdump import CrashRun, run_crash
from .observe.observation import Observation
from .observe.observer import Observer
from .observe.plan import make_plan
from .observe.stage2 import CLOBBERED_AT_ENTRY, finish_run, watch_stage2
from .oracle import Prediction, analyze
from .oracle.diagnose import load_diagnoses
from .oracle.placement import DEFAULT_VERSION, version_family
from .oracle.placement_check import PlacementCheck, check_placement
from .prepare import CPUS_FILE, CaseRequest, PreparedCase, guest_commands, prepare_case, put_bootargs_in_dtb
from .report.artifacts import write_case_artifacts
from .verdict import OracleComparison, Stage2, Verdict, fold_placement, judge_stage2

# What callers import from here: the request, the preparation and the run, and the stage-2 watch.
__all__ = [
    "TIMEOUTS",
    "CaseRequest",
    "CaseResult",
    "PreparedCase",
    "guest_commands",
    "prepare_case",
    "run_case",
    "watch_stage2",
]

TAIL_IN_REASONS = 15  # console lines quoted in a hang's reasons (console.log has them all)
TIMEOUTS = PHASES  # the per-phase deadlines (deadlines.py), under the name the tests know
LAYOUT_ONLY = "layout only (--until kernel-entry): judged at the kernel entry, stage 2 not booted"


@dataclass(frozen=True)
class Stage1Origin:
    """How stage 1 came up: "boot", "boot, saved" or "snapshot" (restored), and the profile's snapshot key."""

    source: str
    snapshot: str | None
    why: str | None = None  # why a case that may use snapshots booted (machine.snapshot_refused)
    share: str | None = None  # how the case's files reached stage 1 (emulator/share.py)

    def to_dict(self) -> dict:
        why = {"why": self.why} if self.why else {}
        return {"from": self.source, "snapshot": self.snapshot, "share": self.share} | why


def prediction_dict(p: Prediction) -> dict:
    """result.json's `predicted`: the oracle's view, or why it has none (an error is all it says then)."""
    if "error" in p.details:
        return {"verdict": p.verdict, "error": p.details["error"], "collisions": []}
    return p.to_dict()


@dataclass(frozen=True)
class CaseResult:
    request: CaseRequest
    verdict: Verdict
    timings: dict[str, float]
    inputs: dict[str, Input] = field(default_factory=dict)
    kexec_log: kexeclog.KexecLog | None = None  # the parsed `kexec --debug` load plan
    prediction: Prediction | None = None  # the static oracle on the same addresses
    stage2_report: Stage2 | None = None  # what the second kernel's init printed
    kexec_rc: int | None = None
    loader_version: str | None = None
    qemu_version: str | None = None
    observation: Observation | None = None  # with --observe
    agreement: OracleComparison | None = None  # does the oracle agree with the emulator (and with kexec)?
    placement: PlacementCheck | None = None  # kexec's placement against the oracle's rules for the loader
    stage1: Stage1Origin | None = None
    image_set: dict | None = None  # where the Debian inputs came from (suite, lock, drift)
    kdump: dict | None = None  # mode kdump: the reservation, crash oracle, outside writes, vmcore (kdump.py)

    # The result.json views of the typed parts (what readers of result.json see).
    @property
    def load(self) -> dict | None:
        return self.kexec_log.to_dict() if self.kexec_log else None

    @property
    def predicted(self) -> dict | None:
        return prediction_dict(self.prediction) if self.prediction is not None else None

    @property
    def stage2(self) -> dict | None:
        return self.stage2_report.to_dict() if self.stage2_report is not None else None

    @property
    def observed(self) -> dict | None:
        return self.observation.to_dict() if self.observation is not None else None

    @property
    def oracle(self) -> dict | None:
        return self.agreement.to_dict() if self.agreement is not None else None

    def to_dict(self) -> dict:
        m = self.request.machine
        truth = (
            {}
            if self.observation is None
            else {
                "observed": self.observed,
                "oracle_agrees": self.agreement.agrees if self.agreement else None,
                "oracle_difference": list(self.agreement.differences) if self.agreement else None,
            }
        )
        return {
            **self.verdict.to_dict(),
            "machine": m.name,
            "ram": {"base": m.ram_base, "size": self.request.ram},
            "smp": m.smp,
            "kexec_args": list(self.request.kexec_args),
            "load": self.load,
            "predicted": self.predicted,
            "stage2": self.stage2,
            "inputs": {
                **({"debian": self.image_set} if self.image_set else {}),
                **{role: i.to_dict() for role, i in self.inputs.items()},
            },
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "placement_check": self.placement.to_dict() if self.placement else None,
            "kexec_rc": self.kexec_rc,
            "loader_version": self.loader_version,
            "qemu_version": self.qemu_version,
            "stage1": self.stage1.to_dict() if self.stage1 else None,
            "until": self.request.until,
            "mode": self.request.mode,
            **({"kdump": self.kdump} if self.kdump is not None else {}),
            **truth,
        }


def run_case(case: PreparedCase, say: Callable[[str], None] = lambda s: None) -> CaseResult:
    """Run the case from the profile's stage-1 snapshot when there is one (making it when there is not)."""
    version = ".".join(map(str, qemu_version()))
    usable = case.request.snapshot and case.request.machine.snapshot_refused(case.stage1.share_transport) is None
    slot = claim(case.stage1, version, say) if usable else None
    try:
        return _run_case(case, say, version, slot)
    except SnapshotBroken as err:
        assert slot is not None
        say(f"boot1: {err}; dropping that snapshot and booting instead")
        slot.drop()
        return _run_case(case, say, version, None)
    finally:
        if slot is not None:
            slot.release()


@dataclass
class _Run:
    """What one run has gathered so far: a failure at any step still reports everything before it."""

    stage1: Stage1Origin
    timings: dict[str, float] = field(default_factory=dict)
    phase: str = "boot1"
    verdict: Verdict = Verdict("error", "boot1", ("bench did not start",))
    loader_version: str | None = None
    kexec_rc: int | None = None
    log: kexeclog.KexecLog | None = None
    prediction: Prediction | None = None
    observation: Observation | None = None
    agreement: OracleComparison | None = None
    placement: PlacementCheck | None = None
    stage2: Stage2 | None = None
    kdump: dict | None = None


def _run_case(case: PreparedCase, say: Callable[[str], None], version: str, slot: Slot | None) -> CaseResult:
    request = case.request
    commands = guest_commands(case)
    (case.share / "autorun.sh").write_text("\n".join(commands) + "\n")
    incoming = slot.state if slot is not None and slot.ready else None
    refused = request.machine.snapshot_refused(case.stage1.share_transport) if request.snapshot else None
    source = "snapshot" if incoming else "boot"
    run = _Run(Stage1Origin(source, slot.key if slot else None, refused, case.stage1.share_transport))
    try:
        # --gdb opens the gdbstub for the user (and lifts every deadline); --observe uses it itself.
        with QemuProcess(
            case.stage1,
            request.out,
            gdb=request.observing or request.gdb,
            debugger_attached=request.gdb,
            incoming=incoming,
        ) as qemu:
            if request.gdb:
                say(f"gdbstub for you: gdb-multiarch -ex 'target remote {qemu.sockets.gdb}' (no deadlines)")
            assert qemu.console is not None
            shell = Shell(qemu.console)
            _stage1(qemu, shell, slot, incoming is not None, run, say)
            _setup(case, shell, commands, run)
            run.phase = "load"
            if request.mode == "kdump":
                _crash(case, qemu, shell, commands, run, say)
            elif _load(case, shell, commands[-2], run, say):
                run.phase = "handoff"  # from here an observer failure belongs to kexec -e, not to the load
                _exec(case, qemu, shell, commands[-1], run, say)
    except (ConsoleTimeout, ConsoleClosed) as err:
        # Only stage-1 waits get here (the stage-2 watch judges its own silence): a hang before kexec -e is
        # the bench's or stage 1's problem, not a kexec finding.
        tail = "\n".join(err.tail.splitlines()[-TAIL_IN_REASONS:])
        headline = str(err).splitlines()[0].removesuffix("; last console lines:")
        quoted = f"last console lines:\n{tail}" if tail.strip() else "the console printed nothing"
        run.verdict = Verdict("error", run.phase, (headline, quoted))
    except SnapshotBroken:
        raise  # run_case drops the snapshot and boots instead
    except BenchError as err:  # GdbError included: the observation itself broke
        run.verdict = Verdict("error", run.phase, (str(err),))
    timings = run.timings
    # stop_* and observe lie inside stage2 (kexec -e to the end): not added twice
    timings["total"] = sum(v for k, v in timings.items() if k in ("boot1", "setup", "load", "stage2"))
    result = CaseResult(
        request=request,
        verdict=run.verdict,
        timings=timings,
        inputs=case.inputs,
        kexec_log=run.log,
        stage2_report=run.stage2,
        kexec_rc=run.kexec_rc,
        qemu_version=version,
        prediction=run.prediction,
        loader_version=run.loader_version,
        observation=run.observation,
        agreement=run.agreement,
        placement=run.placement,
        stage1=run.stage1,
        image_set=case.image_set,
        kdump=run.kdump,
    )
    title = (
        f"{request.machine.name} {' '.join(request.kexec_args) or 'default placement'}: "
        f"{result.verdict.verdict} ({result.verdict.phase})"
    )
    write_case_artifacts(request.out, case.share, case.stage1, result.to_dict(), commands, title)
    return result


def _stage1(
    qemu: QemuProcess, shell: Shell, slot: Slot | None, restoring: bool, run: _Run, say: Callable[[str], None]
) -> None:
    """Stage 1 at its shell prompt: restored from the profile's snapshot, or booted (and saved, when this
    process claimed the profile's snapshot)."""
    t0 = time.monotonic()
    if restoring:
        say("boot1: restoring the stage-1 snapshot")
        wait_restored(qemu)
        qemu.cont()
    else:
        qemu.cont()
        say("boot1: booting the stage-1 kernel")
        shell.wait_ready(TIMEOUTS["boot1"])
        if slot is not None and slot.lock_fd is not None:
            say("boot1: saving the stage-1 snapshot for the next cases of this profile")
            try:
                run.timings["snapshot_save"] = slot.save(qemu, time.monotonic() - t0)
                run.stage1 = replace(run.stage1, source="boot, saved")
            except BenchError as err:  # no snapshot is only slower: carry on with this boot
                say(f"boot1: {err}")
            qemu.cont()
    run.timings["boot1"] = time.monotonic() - t0


def _setup(case: PreparedCase, shell: Shell, commands: list[str], run: _Run) -> None:
    t_setup = time.monotonic()
    for i, command in enumerate(commands[:-2]):
        result = shell.run(command, TIMEOUTS["command"], command.split()[0])
        if result.rc != 0:
            raise BenchError(f"stage-1 command failed ({result.rc}): {command}\n{result.output}")
        if i == 0 and case.bootargs_in_dtb:  # the share's board.dtb exists now
            put_bootargs_in_dtb(case)
        if command.endswith("--version"):
            run.loader_version = _kexec_version(result.output)
    run.timings["setup"] = time.monotonic() - t_setup


def _load(case: PreparedCase, shell: Shell, command: str, run: _Run, say: Callable[[str], None]) -> bool:
    """kexec -l: the load plan it printed and the oracle's view of it. False when kexec refused the load."""
    say("load: kexec --debug -l")
    loaded = shell.run(command, TIMEOUTS["load_base"] + TIMEOUTS["load_per_mib"] * _mib(case), "kexec -l")
    run.timings["load"] = loaded.seconds
    run.kexec_rc = loaded.rc
    debug_text = (case.share / "kexec-debug.txt").read_text(errors="replace")
    run.log = _parse_load(debug_text)
    run.prediction = _predict(run.log, case, run.loader_version)
    if run.log is not None:
        family = case.kexec_family or version_family(run.loader_version or DEFAULT_VERSION)
        run.placement = check_placement(run.log, case.zimage, family, case.request.kexec_args)
    if loaded.rc in (126, 127):  # the shell could not run the loader at all: our problem
        raise BenchError(f"stage 1 could not run kexec (exit {loaded.rc}): {debug_text.strip()[:200]}")
    if loaded.rc != 0:
        tail = " | ".join(debug_text.strip().splitlines()[-3:])
        cpus_file = case.share / CPUS_FILE  # stage 1's CPUs (set-up): a refusal only SMP explains comes first
        stage1_cpus = Cpus.parse(cpus_file.read_text()) if cpus_file.is_file() else None
        why = load_refusal(debug_text, stage1_cpus, case.request.machine.cpu_hotplug)
        why += load_diagnoses(run.loader_version, case.kexec_command, debug_text)
        run.verdict = Verdict("fail", "load", (*why, f"kexec -l exited {loaded.rc}: {tail}"))
        return False
    return True


def _exec(
    case: PreparedCase, qemu: QemuProcess, shell: Shell, command: str, run: _Run, say: Callable[[str], None]
) -> None:
    """kexec -e, the observer's stops (with --observe) and the end of the run."""
    request = case.request
    observer = _observer(case, qemu, run.log, run.prediction) if request.observing else None
    if observer is not None:
        observer.arm()
    say("handoff: kexec -e")
    t_exec = time.monotonic()
    start = shell.send(command)
    observation = None
    resumed_at = None
    if observer is not None:
        observation = observer.observe(t_exec)
        resumed_at = time.monotonic()
        for stop in observation.stops:
            if stop.seconds is not None:
                run.timings[f"stop_{stop.name}"] = stop.seconds
        run.timings["observe"] = resumed_at - t_exec
        if observation.hang is not None:  # no stop_kernel then: record how long the bench waited
            run.timings[f"{observation.hang.phase}_waited"] = observation.hang.waited
    prediction = run.prediction

    def judge_console(after: str, ended_by: str) -> Verdict:
        if ended_by == "kernel-entry":
            return Verdict("pass", "kernel", (LAYOUT_ONLY,))
        if ended_by == "clobbered":
            return Verdict("fail", "kernel", (CLOBBERED_AT_ENTRY,))
        verdict = judge_stage2(
            after, request.stage2_cmdline, case.payload_sha256, ended_by, expected_cpus=request.machine.smp
        )
        if verdict.verdict == "fail" and prediction is not None:
            verdict = replace(verdict, reasons=verdict.reasons + _oracle_reasons(prediction))
        return verdict

    end = finish_run(
        qemu,
        observer,
        observation,
        prediction,
        judge_console,
        until=request.until,
        start=start,
        mib=_mib(case),
        resumed_at=resumed_at,
    )
    run.timings["stage2"] = time.monotonic() - t_exec
    run.observation, run.stage2 = end.observation, end.stage2
    run.verdict, run.agreement = fold_placement(end.verdict, end.oracle, run.placement)


def _crash(
    case: PreparedCase, qemu: QemuProcess, shell: Shell, commands: list[str], run: _Run, say: Callable[[str], None]
) -> None:
    """Mode kdump: kexec -p and the panic (kdump.py); what it gathered is kept even when it raises."""
    crash = CrashRun()
    try:
        run_crash(case, qemu, shell, commands[-2], commands[-1], run.loader_version, crash, say)
    finally:
        run.phase = crash.phase
        run.timings.update(crash.timings)
        run.kexec_rc, run.log, run.placement = crash.kexec_rc, crash.log, crash.placement
        run.prediction = crash.crash.prediction if crash.crash is not None else None
        run.observation, run.agreement, run.stage2 = crash.observation, crash.agreement, crash.stage2
        run.kdump = crash.to_dict()
        if crash.verdict is not None:
            run.verdict = crash.verdict


def _mib(case: PreparedCase) -> int:
    return (case.inputs["initrd"].size >> 20) + 1


def _parse_load(text: str) -> kexeclog.KexecLog | None:
    try:
        return kexeclog.parse_kexec_log(text)
    except kexeclog.KexecLogError:
        return None


def _kexec_version(output: str) -> str | None:
    match = re.search(r"kexec-tools (\S+)", output)
    return match.group(1) if match else None


def _predict(log: kexeclog.KexecLog | None, case: PreparedCase, kexec_version: str | None) -> Prediction | None:
    """The oracle's view of the load kexec actually made: the same addresses, judged statically."""
    if log is None:
        return None
    m, ram = case.request.machine, case.request.ram
    try:
        return analyze(
            log,
            zimage=case.zimage,
            kexec_version=kexec_version,
            kernel_version=case.inputs["kernel"].version,
            memory=((m.ram_base, m.ram_base + ram),),  # QEMU writes /memory from -m; a no-map hole stays in it
        )
    except UserError as err:
        return Prediction("unknown", (), (), (), details={"error": str(err)})


def _oracle_reasons(prediction: Prediction) -> tuple[str, ...]:
    fatal = [c for c in prediction.collisions if c.severity == "fatal"]
    return tuple(f"oracle: {c.a} x {c.b} [{c.start:#x}, {c.end:#x}) fatal" for c in fatal)


def _observer(
    case: PreparedCase, qemu: QemuProcess, log: kexeclog.KexecLog | None, prediction: Prediction | None
) -> Observer:
    if log is None or log.entry is None and log.kernel is None:
        raise BenchError("--observe: the kexec --debug output has no entry address to stop at")
    m = case.request.machine
    plan = make_plan(
        log,
        case.zimage,
        (m.ram_base, m.ram_base + case.request.ram),
        prediction,
        {"kernel": case.share / "zImage", "initrd": case.share / "initrd.img"},
        case.request.stage2_cmdline,
    )
    return Observer(qemu.sockets.gdb, qemu.pmemsave, plan, case.request.out / "observe")
