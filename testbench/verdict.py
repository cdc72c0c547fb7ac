"""From what the console showed after `kexec -e` to a verdict: pass / fail / error, a phase and reasons.

Phases, in order: boot1 (stage-1 boot), load (kexec -l), handoff (kexec -e to zImage entry), decompress
(zImage entry to kernel entry), kernel (kernel entry to stage-2 init), init (stage-2 init to the marker).
The phase of a failure is the phase that was entered and never completed. Without the gdbstub stops the
console cannot tell handoff from decompress: silence after "Bye!" is reported as `handoff`.
"""

import json
import re
from dataclasses import dataclass, field

PHASES = ("boot1", "load", "handoff", "decompress", "kernel", "init")

# Console lines that prove a phase was entered.
PROGRESS = (
    ("handoff", r"Bye!"),
    ("kernel", r"Booting Linux on physical CPU"),
    ("init", r"Run /init as init process|TESTBENCH-STAGE2-INIT"),
)

STAGE2_MARKER = r"^TESTBENCH-STAGE2 (\{.*\})$"


@dataclass(frozen=True)
class Signature:
    phase: str
    pattern: str
    reason: str  # may use {0} for the whole match, {1}... for groups


# Failure signatures after kexec -e. Each names what was most likely damaged, for the reader of the report.
SIGNATURES = (
    Signature("kernel", r"Error: invalid dtb[^\n]*",
              "DTB clobbered or not passed: the kernel says '{0}'"),
    Signature("kernel", r"INITRD: (0x[0-9a-f]+\+0x[0-9a-f]+) overlaps in-use memory region",
              "initrd overlaps the kernel ({1}): the kernel disabled the initrd"),
    Signature("kernel", r"Initramfs unpacking failed: ([^\n]*)",
              "initrd clobbered: Initramfs unpacking failed: {1}"),
    Signature("kernel", r"Unable to handle kernel [^\n]*", "kernel oops: {0}"),
    Signature("kernel", r"Kernel panic - not syncing: ([^\n]*)", "Kernel panic: {1}"),
    Signature("kernel", r"No working init found", "no init in the initrd: the initrd was lost or clobbered"),
)


@dataclass(frozen=True)
class Stage2:
    cmdline: str
    iomem_ram: tuple[str, ...]
    fdt_sha256: str
    payload_sha256: str
    payload_size: int | None

    def to_dict(self) -> dict:
        return {"cmdline": self.cmdline, "iomem_ram": list(self.iomem_ram), "fdt_sha256": self.fdt_sha256,
                "payload_sha256": self.payload_sha256, "payload_size": self.payload_size}


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
    return Stage2(cmdline=data.get("cmdline", ""), iomem_ram=tuple(data.get("iomem_ram", ())),
                  fdt_sha256=data.get("fdt_sha256", ""), payload_sha256=data.get("payload_sha256", ""),
                  payload_size=data.get("payload_size"))


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


def judge_stage2(after_exec: str, expected_cmdline: str, expected_payload_sha256: str | None,
                 ended_by: str) -> Verdict:
    """Judge the console text that followed `kexec -e`.

    `ended_by` says why we stopped reading: "marker", "exit" (QEMU exited: panic=-1 with -no-reboot, or
    poweroff), "silence" (nothing new for the silence window) or "timeout".
    """
    stage2 = parse_stage2(after_exec)
    phase = phase_reached(after_exec)
    reasons = signature_reasons(after_exec)
    if stage2 is not None:
        problems = []
        if stage2.cmdline.strip() != expected_cmdline.strip():
            problems.append(f"command line differs: got {stage2.cmdline!r}, requested {expected_cmdline!r}")
        if expected_payload_sha256 is not None and stage2.payload_sha256 != expected_payload_sha256:
            problems.append(f"initrd payload sha256 {stage2.payload_sha256 or 'missing'} != "
                            f"host {expected_payload_sha256}: the initrd was clobbered")
        if problems:
            return Verdict("fail", "init", tuple(problems + reasons))
        return Verdict("pass", "init", ("stage-2 init reached; initrd payload and command line intact",))
    if not reasons:
        if phase == "handoff" and "Bye!" in after_exec:
            reasons.append("silence after Bye!: the new kernel never printed; the decompressor or the early "
                           "kernel hung (typically a clobbered DTB or decompressor)")
        elif phase == "handoff":
            reasons.append("kexec -e did not reach Bye!: the first kernel did not hand over")
        else:
            reasons.append(f"stage 2 stopped in phase {phase} without a known signature ({ended_by})")
    return Verdict("fail", phase, tuple(reasons))
