"""Every deadline of the bench in one place, and the one factor that scales them all.

Values are seconds before TESTBENCH_TIMEOUT_FACTOR (a slow host sets it above 1). The factor is read once
per process and applied to every wait; a debugger attached (`--gdb`) turns the console's deadlines off
instead.
"""

import functools
import os

from .errors import BenchError

FACTOR_ENV = "TESTBENCH_TIMEOUT_FACTOR"

# The phases of a case. Measured on 2 TCG cores: stage 1 boots in ~5 s, kexec -l of a 32 MB initrd over 9p
# takes ~4 s (100 MB took 48 s with the host fully loaded, hence 0.8 s/MiB), a stage-2 boot ~7 s plus ~0.1 s
# per MiB of payload. From "Bye!" to the new kernel's first earlycon line takes ~3 s (handoff + XZ
# decompression), so 15 s of silence there is a hang (15 s leaves room for a loaded host). When the
# observer saw the kernel entry, handoff and decompression are behind us and earlycon speaks within
# ~0.5 s: 6 s of silence is a hang.
PHASES = {
    "boot1": 90.0,
    "command": 30.0,
    "load_base": 30.0,
    "load_per_mib": 0.8,
    "stage2_base": 90.0,
    "stage2_per_mib": 0.6,
    "silence": 15.0,
    "silence_after_entry": 6.0,
}
# The observer's stops: kexec -e to zImage entry 0.5-0.7 s, zImage entry to kernel entry (XZ) 1.9-2.4 s
# (DOMAIN 8.5); 30 s leaves a wide margin for a loaded host.
STOPS = {"handoff": 30.0, "decompress": 30.0}
# The emulator machinery, with room for a fully loaded host:
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
