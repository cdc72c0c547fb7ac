"""Did kexec place the segments where the oracle's rules for that loader say? (The oracle's other half.)

`analyze` judges the addresses kexec printed; this module recomputes those addresses from the zImage, the
log's own MEMORY RANGES and sizes, and the kexec arguments, with `place()` and the loader's rule family,
and names every difference. A loader that places differently from its family is a finding about the
model (or the loader), never something to tune away.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..inputs.kexeclog import KexecLog
from ..inputs.zimage import ZImage
from ..sizes import parse_size
from .analyze import place_zimage
from .placement import ULONG_MAX, PlacementError

# kexec's own options that change placement; --opt=VALUE or --opt VALUE
PLACEMENT_OPTIONS = {"--image-size": "image_size", "--mem-min": "mem_min", "--mem-max": "mem_max"}


@dataclass(frozen=True)
class PlacementCheck:
    family: str
    agrees: bool
    predicted: dict[str, int | None]  # kernel, image_size, initrd, dtb addresses by the rules
    differences: tuple[str, ...]

    def to_dict(self) -> dict:
        return {
            "family": self.family,
            "agrees": self.agrees,
            "predicted": self.predicted,
            "differences": list(self.differences),
        }


def placement_options(kexec_args: Sequence[str]) -> dict[str, int]:
    """--image-size, --mem-min and --mem-max from kexec's command line (the rest does not move segments)."""
    out: dict[str, int] = {}
    items = list(kexec_args)
    for i, item in enumerate(items):
        name, _, value = item.partition("=")
        if name in PLACEMENT_OPTIONS:
            if not value and i + 1 < len(items):
                value = items[i + 1]
            out[PLACEMENT_OPTIONS[name]] = parse_size(value, name)
    return out


def check_placement(
    log: KexecLog, zimage: ZImage, family: str, kexec_args: Sequence[str] = ()
) -> PlacementCheck | None:
    """None when the log lacks what placement needs (MEMORY RANGES and a Kernel: line)."""
    if not log.memory_ranges or log.kernel is None:
        return None
    options = placement_options(kexec_args)
    try:
        pl = place_zimage(
            zimage,
            log.memory_ranges,
            family,
            options.get("image_size"),
            log.initrd.size if log.initrd else None,
            log.dtb.size if log.dtb else None,
            file_size=log.file_size,
            mem_min=options.get("mem_min", 0),
            mem_max=options.get("mem_max", ULONG_MAX),
        )
    except PlacementError as err:
        return PlacementCheck(family, False, {}, (f"the rules refuse this load, kexec did not: {err}",))
    predicted = {
        "kernel": pl.kernel_base,
        "image_size": pl.image_size,
        "initrd": pl.initrd[0] if pl.initrd else None,
        "dtb": pl.dtb[0] if pl.dtb else None,
    }
    seen = {
        "kernel": log.kernel.address,
        "image_size": log.kernel.size,
        "initrd": log.initrd.address if log.initrd else None,
        "dtb": log.dtb.address if log.dtb else None,
    }
    differences = tuple(
        f"{what}: kexec {_hex(seen[what])}, the {family} rules {_hex(predicted[what])}"
        for what in predicted
        if seen[what] != predicted[what]
    )
    return PlacementCheck(family, not differences, predicted, differences)


def _hex(value: int | None) -> str:
    return "none" if value is None else f"{value:#x}"
