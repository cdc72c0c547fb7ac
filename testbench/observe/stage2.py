"""After kexec -e: watch the second kernel on the console, and finish a run (the one end of `testbench run`
and `testbench replay`): stage-2 watch, kernel log from RAM after a silent hang, the console verdict, the
oracle against the emulator, and the ground truth folded into the verdict."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

from ..deadlines import PHASES
from ..emulator.console import Console, ConsoleTimeout, timeout_factor
from ..emulator.qemu import QemuProcess
from ..oracle import Prediction
from ..verdict import STAGE2_MARKER, OracleComparison, Stage2, Verdict, compare_oracle, judge_observation, parse_stage2
from .observation import Observation
from .observer import Observer
from .postmortem import kernel_log_lines

KERNEL_LOG_SPAN = 32 << 20  # RAM above the kernel entry searched for log lines after a silent hang


class HasConsole(Protocol):
    @property
    def console(self) -> Console | None: ...


def watch_stage2(
    qemu: HasConsole, start: int, mib: int, resumed_at: float | None = None, kernel_entered: bool = False
) -> str:
    """Read the console after kexec -e until the marker, QEMU's exit, silence, or the deadline.

    Silence only ends the wait before the new kernel has printed anything: that is the hang this bench
    exists for (a clobbered DTB or decompressor). Later quiet stretches (initramfs unpacking, the payload
    checksum) are legitimate and only the phase deadline applies to them. `resumed_at` is when the
    observer let the VM go: the time gdb held it stopped is not guest silence, and not stage-2 time.
    """
    console = qemu.console
    assert console is not None
    budget = PHASES["stage2_base"] + PHASES["stage2_per_mib"] * mib
    deadline = None if console.no_deadlines else time.monotonic() + budget * timeout_factor()
    quiet_since = resumed_at or 0.0
    silence = PHASES["silence_after_entry" if kernel_entered else "silence"] * timeout_factor()
    while True:
        try:
            found = console.wait_for(STAGE2_MARKER, 1.0, "stage 2", start, fail_on_close=False)
        except ConsoleTimeout:
            quiet = time.monotonic() - max(console.last_data_at, quiet_since)
            if not console.no_deadlines and quiet > silence and "Booting Linux" not in console.text[start:]:
                return "silence"
            if deadline is not None and time.monotonic() > deadline:
                return "timeout"
            continue
        return "exit" if found is None else "marker"


def kernel_log_from_ram(qemu: QemuProcess, observer: Observer) -> tuple[str, ...]:
    """After a silent stage 2: halt the VM (gdb has detached, so QMP owns it now) and grep the kernel's
    RAM for log lines; the log buffer lies in the kernel's data/bss above the kernel entry."""
    assert qemu.qmp is not None
    plan = observer.plan
    ram_end = plan.fill[1] if plan.fill else plan.kernel_entry + KERNEL_LOG_SPAN
    size = max(0, min(KERNEL_LOG_SPAN, ram_end - plan.kernel_entry))
    try:
        qemu.qmp.cmd("stop")
        path = observer.out / "silent-kernel-ram.bin"
        qemu.pmemsave(plan.kernel_entry, size, path)
        lines = kernel_log_lines(path.read_bytes())
        path.unlink()
        return lines
    except Exception as err:  # QEMU may exit under us (panic=-1): a missing post-mortem is not an error
        return (f"(no post-mortem dump: {err})",)


@dataclass(frozen=True)
class RunEnd:
    """How a run ended: the verdict, and what it was made of."""

    verdict: Verdict
    # marker | exit | silence | timeout (stage 2 watched); kernel-entry | observed | clobbered (not watched)
    ended_by: str
    observation: Observation | None
    oracle: OracleComparison | None
    stage2: Stage2 | None

    @property
    def watched(self) -> bool:
        return self.ended_by not in NOT_WATCHED


NOT_WATCHED = ("kernel-entry", "observed", "clobbered")
CLOBBERED_AT_ENTRY = (
    "stage 2 not watched: the DTB was already overwritten at the kernel entry, so the second kernel "
    "cannot find its console or its initrd; only the silence window would follow"
)


def finish_run(
    qemu: QemuProcess,
    observer: Observer | None,
    observation: Observation | None,
    prediction: Prediction | None,
    judge_console: Callable[[str, str], Verdict],
    *,
    until: str,
    start: int,
    mib: int,
    resumed_at: float | None,
) -> RunEnd:
    """The end of a run after kexec -e (or replay's first stop) and the observer's stops, if any.

    Stage 2 is watched unless the run is layout only (`until` kernel-entry) or a stop never came (the VM was
    halted and dumped) or the DTB was already clobbered at the kernel entry: the verdict is then known, and
    waiting out the new kernel's silence would only cost time. `judge_console(console text since
    start, ended_by)` is the caller's console verdict; the emulator's ground truth (with the oracle's
    agreement) is folded into it here."""
    if until == "kernel-entry":
        ended_by = "kernel-entry"  # layout only: the ground truth is the verdict
    elif observation is not None and observation.phase in ("handoff", "decompress"):
        ended_by = "observed"  # the stop never came: the VM was halted and dumped
    elif (
        observation is not None
        and observation.phase == "kernel"
        and any(c.segment == "dtb" for c in observation.clobbered)
    ):
        # Without its DTB the new kernel finds no console: only the silence window would follow. (With the
        # initrd alone clobbered it boots and says so within seconds, e.g. "Initramfs unpacking failed".)
        ended_by = "clobbered"
    else:
        entered = observation is not None and observation.phase == "kernel"
        ended_by = watch_stage2(qemu, start, mib, resumed_at, entered)
    if observation is not None and observer is not None and ended_by in ("silence", "timeout") and qemu.running():
        observation = replace(observation, kernel_log=kernel_log_from_ram(qemu, observer))
    assert qemu.console is not None
    after = qemu.console.text[start:]
    verdict = judge_console(after, ended_by)
    oracle = None
    if observation is not None:
        oracle = compare_oracle(observation, prediction)
        verdict = judge_observation(verdict, observation, oracle)
    return RunEnd(verdict, ended_by, observation, oracle, parse_stage2(after))
