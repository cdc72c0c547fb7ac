"""CPUs and kexec on SMP: Linux CPU lists, what stage 1 had, and what the CPU count explains.

On 32-bit ARM, `machine_kexec_prepare()` (arch/arm/kernel/machine_kexec.c) refuses a load with EINVAL when
more than one CPU is possible and the board's SMP operations cannot take a CPU offline (no `cpu_kill`): kexec
-e must park every other CPU first. kexec-tools then says only "kexec_load failed: Invalid argument", and
the kernel logs nothing. `nr_cpus=1` on the first kernel makes one CPU possible; `maxcpus=1` does not (it
only leaves the others offline: they stay possible). Pure: no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

EINVAL_LOAD = re.compile(r"kexec_load failed: Invalid argument")


def cpu_count(cpu_list: str | None) -> int | None:
    """The number of CPUs in a Linux CPU list ("0", "0-3", "0,2-3"); None when it cannot be read."""
    if cpu_list is None:
        return None
    total = 0
    for part in cpu_list.strip().split(","):
        first, _, last = part.partition("-")
        if not first.isdigit() or (last and not last.isdigit()):
            return None
        total += int(last or first) - int(first) + 1
    return total


@dataclass(frozen=True)
class Cpus:
    """A kernel's CPUs as /sys/devices/system/cpu says them."""

    possible: str | None
    online: str | None

    @classmethod
    def parse(cls, text: str) -> Cpus:
        """The stage-1 set-up's line: `possible 0-3 online 0`."""
        words = dict(re.findall(r"(possible|online) (\S+)", text))
        return cls(words.get("possible"), words.get("online"))

    def to_dict(self) -> dict:
        return {"possible": self.possible, "online": self.online}


def load_refusal(debug_text: str, stage1: Cpus | None, cpu_hotplug: bool) -> tuple[str, ...]:
    """Why `kexec -l` failed, when the CPU count explains it: EINVAL with several CPUs possible."""
    possible = cpu_count(stage1.possible) if stage1 is not None else None
    if not EINVAL_LOAD.search(debug_text) or possible is None or possible < 2:
        return ()
    why = (
        "the board's SMP operations have no cpu_kill (machines.toml cpu_hotplug = false)"
        if not cpu_hotplug
        else "EINVAL is what machine_kexec_prepare answers when the board's SMP operations have no cpu_kill"
    )
    return (
        f"a CPU cannot be taken offline: {possible} CPUs possible ({stage1.possible if stage1 else '?'}) and "
        f"{why}, so the kernel refuses kexec_load (EINVAL); boot the first kernel with nr_cpus=1 "
        "(maxcpus=1 is not enough: the other CPUs stay possible)",
    )


def stage2_cpu_problems(online: str | None, possible: str | None, expected: int) -> list[str]:
    """The second kernel must bring up every CPU the case runs (QEMU -smp)."""
    got = cpu_count(online)
    if got == expected:
        return []
    return [
        f"stage 2 brought up {got if got is not None else 'an unknown number of'} CPU(s) (online "
        f"{online or '?'}, possible {possible or '?'}); the case runs {expected} (--smp)"
    ]


# Console lines after kexec -e that say where SMP went wrong (the phase is the one they belong to).
SMP_SIGNS = (
    (r"CPU(\d+): failed to (?:boot|come online)[^\n]*", "stage 2 could not start a secondary CPU: '{0}'"),
    (r"CPU(\d+): failed to die[^\n]*|CPU\d+ may not have shut down cleanly[^\n]*", "a CPU did not go offline: '{0}'"),
)


def handoff_cpu_reasons(after_exec: str) -> list[str]:
    """kexec -e started taking the other CPUs offline and never said Bye!: the first kernel hung there."""
    if "Disabling non-boot CPUs" in after_exec and "Bye!" not in after_exec:
        return [
            "the first kernel stopped while taking the other CPUs offline (Disabling non-boot CPUs ..., no "
            "Bye!): CPU hotplug did not complete, so kexec -e never reached the new kernel"
        ]
    return []


def smp_sign_reasons(after_exec: str) -> list[str]:
    reasons = []
    for pattern, reason in SMP_SIGNS:
        match = re.search(pattern, after_exec)
        if match:
            reasons.append(reason.format(match.group(0)))
    return reasons
