"""Every deadline of the bench's own machinery in one table, and the one factor that scales them all.

Values are seconds before TESTBENCH_TIMEOUT_FACTOR (a slow host sets it above 1). The factor is read once
per process and applied to every wait; a debugger attached (`--gdb`) turns the console's deadlines off
instead. The phase budgets of a case (boot, load, stage 2, silence) and the observer's stop deadlines live
beside the code that waits on them and are scaled by the same `factor()`.
"""

import functools
import os

from .errors import BenchError

FACTOR_ENV = "TESTBENCH_TIMEOUT_FACTOR"

# Measured on 2 TCG cores, with room for a fully loaded host:
BUDGETS = {
    "qemu_start": 30.0,  # QEMU creates its QMP and console sockets in < 0.1 s
    "qemu_probe": 30.0,  # `qemu-system-arm --version` / `-M X,help`: milliseconds
    "snapshot_save": 60.0,  # a 50 MiB stage-1 state migrates out in 0.1-0.2 s
    "snapshot_lock": 300.0,  # another case may be booting the same stage-1 profile (~5 s, 90 s worst)
    "snapshot_restore": 60.0,  # -incoming restores in ~0.1 s
    "gdb_reply": 10.0,  # a gdbstub packet round trip: milliseconds, a 64-packet write batch ~0.2 s
    "gdb_step": 5.0,  # one single-step or an interrupt of a running VM
}


@functools.cache
def factor() -> float:
    raw = os.environ.get(FACTOR_ENV, "1")
    try:
        value = float(raw)
    except ValueError:
        raise BenchError(f"{FACTOR_ENV}={raw!r} is not a number") from None
    if value <= 0:
        raise BenchError(f"{FACTOR_ENV} must be positive")
    return value


def budget(name: str) -> float:
    """The scaled deadline for one of BUDGETS."""
    return BUDGETS[name] * factor()
