"""What one observed kexec -e found: the two stops, the clobbered ranges, the decompressor's footprint and,
when a stop never came, the post-mortem. Typed until the JSON edge (`Observation.to_dict()`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from .postmortem import Hang


@dataclass(frozen=True)
class StopReport:
    name: str  # "zimage" or "kernel"
    expected_pc: int
    reached: bool
    seconds: float | None  # from kexec -e (zimage) or from the zImage stop's resume (kernel)
    pc: int | None = None
    r2: int | None = None
    sctlr: int | None = None
    mmu_off: bool | None = None
    problems: tuple[str, ...] = ()


@dataclass(frozen=True)
class Clobber:
    segment: str
    start: int
    end: int  # exclusive
    offset: int  # from the segment start
    end_offset: int

    @property
    def label(self) -> str:
        return f"{self.segment} [{self.start:#x}, {self.end:#x}) = +{self.offset:#x}..+{self.end_offset:#x}"


@dataclass(frozen=True)
class Footprint:
    """The highest byte the decompressor changed, pattern window and segments together."""

    highest_written_end: int | None
    window: tuple[int, int] | None
    reached_window_top: bool

    def to_dict(self) -> dict:
        return {
            "highest_written_end": self.highest_written_end,
            "window": list(self.window) if self.window else None,
            "reached_window_top": self.reached_window_top,
        }


@dataclass(frozen=True)
class Observation:
    phase: str  # the phase the observation saw die, or "kernel" when both stops came
    stops: tuple[StopReport, ...]
    fidelity: tuple[str, ...]  # load fidelity problems at the first stop
    clobbered: tuple[Clobber, ...]  # payload segments (initrd, dtb) changed between the stops
    by_design: tuple[Clobber, ...]  # the zImage's own segment, overwritten by the kernel on purpose
    footprint: Footprint | None = None  # None when the kernel entry never came
    kernel_log: tuple[str, ...] = ()
    dumps: str = ""
    hang: Hang | None = None  # post-mortem when a stop never came

    def stop(self, name: str) -> StopReport | None:
        return next((s for s in self.stops if s.name == name), None)

    def to_dict(self) -> dict:
        d = asdict(replace(self, footprint=None, hang=None))
        d["clobbered"] = [asdict(c) | {"label": c.label} for c in self.clobbered]
        d["by_design"] = [asdict(c) | {"label": c.label} for c in self.by_design]
        d["footprint"] = self.footprint.to_dict() if self.footprint is not None else {}
        d["hang"] = self.hang.to_dict() if self.hang is not None else {}
        return d
