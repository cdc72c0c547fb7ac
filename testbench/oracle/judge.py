"""One verdict per attempt of a pasted report, and the paste's overall verdict.

Each attempt (testbench.inputs.attempts) is judged on its own:
  not loaded   kexec failed before placing it; a diagnosis (oracle.diagnose) says why;
  incomplete   the paste stops before the plan, or lacks what the oracle needs (no zImage size, ...);
  safe, collision, unknown
               oracle.analyze on that attempt's plan alone, with its own C: line (tied by the numbers)
               and its own new kernel's version (banner after its Bye!, else the zImage's file name).
The overall verdict is the worst judged attempt's (collision > unknown > safe): a paste is as bad as the
worst load it shows, and an attempt that never loaded neither hides nor makes a collision. With no
judged attempt it is "not loaded" when one failed, else "incomplete".

Inputs from the command line (Inputs) apply to every judged attempt, except the zImage, which fills only
the attempts whose logged zImage size is the file's (a paste may hold several builds).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from ..inputs.attempts import Attempt, Paste, Unattributed
from ..inputs.kexeclog import KexecLog, Placed
from ..inputs.zimage import ZImage
from .analyze import AnalyzeError, analyze
from .diagnose import Diagnosis, diagnose
from .predict import Prediction

RANK = {"safe": 1, "unknown": 2, "collision": 3}
# What to give `testbench analyze` for each input Prediction.undecided can name.
HINTS = {
    "TEXT_OFFSET": "give --text-offset (0x8000 unless the kernel's config moves it, e.g. ARCH_MESON/MSM "
    "give 0x208000), or --zimage/--vmlinux of this build",
    "restart": "give --zimage of this build (its restart), or paste the decompressor's C: line from booting it",
    "P": "give --zimage or --decompressor-elf of this build (its relocation pad)",
    "decompressor bss": "give --decompressor-elf (arch/arm/boot/compressed/vmlinux) of this build",
    "inflated kernel size": "give --zimage of this build (its KLSZ tag has the sizes)",
    "kernel_address fallback": "give --kernel-version of the kernel being loaded (its 'Linux version' banner)",
}


@dataclass(frozen=True)
class Inputs:
    zimage: ZImage | None = None
    text_offset: int | None = None
    kexec_version: str | None = None  # the rules; by default the log's own `kexec --version` or format
    kernel_version: str | None = None  # overrides what the paste says of the new kernel
    restart: int | None = None  # the decompressor's restart offset, when no --zimage gives it
    efi_stub: bool | None = None  # an EFI stub zImage (restart & ~31 = 0x10a0) or not (0xc0)


@dataclass(frozen=True)
class AttemptVerdict:
    attempt: Attempt
    verdict: str  # safe | collision | unknown | not loaded | incomplete
    prediction: Prediction | None = None
    diagnoses: tuple[Diagnosis, ...] = ()
    notes: tuple[str, ...] = ()
    decide: tuple[str, ...] = ()  # for an unknown: each deciding input, what its values give, how to give it

    @property
    def judged(self) -> bool:
        return self.verdict in RANK

    def to_dict(self) -> dict:
        a, log = self.attempt, self.attempt.log
        return {
            "index": a.index,
            "lines": list(a.lines),
            "kexec_version": a.kexec_version,
            "kexec_version_source": a.kexec_version_source,
            "kernel_version": a.kernel_version,
            "kernel_version_source": a.kernel_version_source,
            "running_kernel": a.running_kernel,
            "command": a.command.text if a.command else None,
            "format": log.format,
            "placement": placement_dict(log),
            "copy": {"line": a.copy.line, "text": a.copy.text, "fit": a.copy_fit} if a.copy else None,
            "executed": a.executed,
            "failures": [{"line": f.line, "text": f.text} for f in a.failures],
            "messages": [{"line": m.line, "kind": m.kind, "text": m.text} for m in a.messages],
            "verdict": self.verdict,
            "prediction": self.prediction.to_dict() if self.prediction is not None else None,
            "diagnoses": [d.to_dict() for d in self.diagnoses],
            "notes": list(self.notes),
            "decide": list(self.decide),
        }


@dataclass(frozen=True)
class PasteVerdict:
    attempts: tuple[AttemptVerdict, ...]
    unattributed: tuple[Unattributed, ...]
    verdict: str  # safe | collision | unknown | not loaded | incomplete
    decided_by: int | None  # the attempt whose verdict is the overall one
    reason: str

    @property
    def deciding(self) -> AttemptVerdict | None:
        return next((v for v in self.attempts if v.attempt.index == self.decided_by), None)

    def to_dict(self) -> dict:
        # The deciding attempt's prediction keys first, where a one-run report had them (collisions,
        # layout, assumptions, undecided, ...), then the paste's own.
        d = self.deciding
        out: dict[str, Any] = dict(d.prediction.to_dict()) if d and d.prediction else {}
        out.update(
            verdict=self.verdict,
            decided_by=self.decided_by,
            reason=self.reason,
            attempts=[v.to_dict() for v in self.attempts],
            unattributed=[{"line": u.copy.line, "text": u.copy.text, "reason": u.reason} for u in self.unattributed],
        )
        return out


def placement_dict(log: KexecLog) -> dict:
    def placed(p: Placed | None) -> dict | None:
        return {"address": p.address, "size": p.size} if p else None

    return {
        "memory_ranges": [list(r) for r in log.memory_ranges],
        "kernel": placed(log.kernel),
        "initrd": placed(log.initrd),
        "dtb": placed(log.dtb),
        "entry": log.entry,
    }


def _decide(pred: Prediction) -> tuple[str, ...]:
    out = []
    for u in pred.undecided:
        hint = next((h for k, h in HINTS.items() if u.startswith(k)), None)
        out.append(f"{u}: {hint}" if hint else u)
    return tuple(out)


def _zimage_for(a: Attempt, zi: ZImage | None) -> tuple[ZImage | None, list[str]]:
    if zi is None:
        return None, []
    z = a.log.zimage_size
    if z is not None and z != zi.size:
        return None, [
            f"--zimage not used: this attempt's zImage is {z:#x} bytes, the file {zi.size:#x} (another build)"
        ]
    return zi, []


def judge_attempt(a: Attempt, inputs: Inputs = Inputs()) -> AttemptVerdict:
    if inputs.kexec_version:  # the user's word wins over the paste's, for the diagnosis too
        a = replace(a, kexec_version=inputs.kexec_version, kexec_version_source="--kexec-version")
    diagnoses = diagnose(a)
    blocking = next((d for d in diagnoses if d.blocks_load), None)
    if blocking is not None:
        # A paste cut before the plan says nothing about the load: that is nothing to judge, not a failure.
        return AttemptVerdict(a, "incomplete" if blocking.kind == "cut-short" else "not loaded", None, diagnoses)
    zi, notes = _zimage_for(a, inputs.zimage)
    trusted = a.kexec_version if a.kexec_version_source not in (None, "text") else None
    # the NEW kernel's version decides the kernel_address fallback (Linux 5.12+), not the running one's
    kernel_version = inputs.kernel_version or a.kernel_version
    try:
        pred = analyze(
            a.log,
            zi,
            inputs.text_offset,
            inputs.kexec_version or trusted,
            kernel_version=kernel_version,
            restart=inputs.restart,
            efi_stub=inputs.efi_stub,
        )
    except AnalyzeError as err:
        return AttemptVerdict(a, "incomplete", None, diagnoses, (*notes, str(err)))
    return AttemptVerdict(a, pred.verdict, pred, diagnoses, tuple(notes), _decide(pred))


def judge(paste: Paste, inputs: Inputs = Inputs(), only: int | None = None) -> PasteVerdict:
    """Every attempt's verdict (or attempt `only`'s alone, 1-based) and the overall one."""
    chosen = paste.attempts if only is None else tuple(a for a in paste.attempts if a.index == only)
    verdicts = tuple(judge_attempt(a, inputs) for a in chosen)
    judged = [v for v in verdicts if v.judged]
    if judged:
        worst = max(judged, key=lambda v: RANK[v.verdict])  # max keeps the first of equals
        others = len(verdicts) - len(judged)
        rest = f"; {others} not judged" if others else ""
        reason = f"attempt {worst.attempt.index} is {worst.verdict}, the worst of {len(judged)} judged attempt(s){rest}"
        return PasteVerdict(verdicts, paste.unattributed, worst.verdict, worst.attempt.index, reason)
    failed = next((v for v in verdicts if v.verdict == "not loaded"), None)
    if failed is not None:
        return PasteVerdict(
            verdicts, paste.unattributed, "not loaded", failed.attempt.index, "no attempt got as far as a placement"
        )
    first = verdicts[0] if verdicts else None
    return PasteVerdict(
        verdicts,
        paste.unattributed,
        "incomplete",
        first.attempt.index if first else None,
        "no attempt shows enough of a load to judge",
    )
