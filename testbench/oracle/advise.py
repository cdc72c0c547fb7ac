"""The smallest --image-size that makes a kexec-tools version's placement safe for a zImage.

"Safe" here is strict: no collision of any severity in any combination of unknown inputs, so the advice
holds even where the verdict logic would call an overlap benign. kexec only uses ALIGN(--image-size, 4K),
so candidates are whole pages. Moving the initrd/DTB up can cross a gap between written regions, so the
answer is the lowest page value from which every larger value up to the bound is safe, found by walking
down from a bound that is safe by construction (the payloads start above everything written).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import UserError
from ..inputs.zimage import ZImage
from .analyze import predict
from .placement import PAGE, ULONG_MAX, PlacementError, align_up
from .predict import Prediction


class AdviceError(UserError):
    """No --image-size makes this load safe."""


@dataclass(frozen=True)
class Advice:
    needed: bool
    image_size: int | None  # smallest page-aligned value; None when not needed
    minimum: int | None  # the smallest integer kexec accepts to the same effect (image_size - 0xfff)
    default: Prediction
    advised: Prediction  # the prediction with image_size (or the default when not needed)
    arithmetic: tuple[str, ...]


def _strict_safe(p: Prediction) -> bool:
    return p.verdict == "safe" and not p.collisions


def _try(
    zimage: ZImage,
    ram: Sequence[tuple[int, int]],
    version: str,
    size: int | None,
    initrd_size: int | None,
    dtb_size: int | None,
    text_offset: int | None,
    window: tuple[int, int] = (0, ULONG_MAX),
) -> Prediction | None:
    try:
        return predict(
            zimage, ram, version, size, initrd_size, dtb_size, text_offset, mem_min=window[0], mem_max=window[1]
        )
    except UserError:
        return None  # kexec itself would refuse (no hole, overlapping segments)


def advise(
    zimage: ZImage,
    ram_ranges: Sequence[tuple[int, int]],
    kexec_version: str,
    initrd_size: int | None = None,
    dtb_size: int | None = None,
    text_offset: int | None = None,
    *,
    mem_min: int = 0,
    mem_max: int | None = None,
) -> Advice:
    ram = sorted(ram_ranges)
    window = (mem_min, ULONG_MAX if mem_max is None else mem_max)  # kexec's --mem-min/--mem-max
    try:
        default = predict(
            zimage, ram, kexec_version, None, initrd_size, dtb_size, text_offset, mem_min=window[0], mem_max=window[1]
        )
    except PlacementError as exc:
        raise AdviceError(f"{exc}; a larger --image-size only moves the initrd and DTB higher") from None
    pl = default.placement
    assert pl is not None
    if zimage.inflated_size is None:
        raise AdviceError(
            "the zImage has no KLSZ tag (kernel older than v4.15): its inflated size is "
            "unknown, so no --image-size can be derived from it"
        )
    if _strict_safe(default):
        return Advice(
            False,
            None,
            None,
            default,
            default,
            (
                f"kexec {pl.family} reserves {pl.image_size:#x} bytes from {pl.kernel_base:#x}; nothing the "
                "decompressor or kernel writes reaches the initrd or DTB, so no --image-size is needed",
            ),
        )
    # Start from a bound above the highest written byte of the shown scenario plus the spread of the
    # unknown decompressor constants (bss 0x1000, P 0x400, restart 0x1000); when other scenarios reach
    # higher (an unknown TEXT_OFFSET), grow the bound until every scenario is clear or kexec runs out of RAM.
    top = max(r.end for r in default.regions if r.role == "written")
    rel = pl.base if pl.family == "<=2.0.12" else pl.kernel_base
    size = align_up(top - rel + 0x3400, PAGE)
    best = _try(zimage, ram, kexec_version, size, initrd_size, dtb_size, text_offset, window)
    step = 0x100000
    while best is not None and not _strict_safe(best) and step <= 0x4000000:
        size += step
        step *= 2
        best = _try(zimage, ram, kexec_version, size, initrd_size, dtb_size, text_offset, window)
    if best is None or not _strict_safe(best):
        reason = (
            "kexec cannot place the payloads that high"
            if best is None
            else ", ".join(c.label for c in best.collisions) or best.verdict
        )
        raise AdviceError(f"no --image-size makes this load safe in this RAM: at {size:#x}: {reason}")
    while size - PAGE > 0:
        trial = _try(zimage, ram, kexec_version, size - PAGE, initrd_size, dtb_size, text_offset, window)
        if trial is None or not _strict_safe(trial):
            break
        size, best = size - PAGE, trial
    if size <= align_up(pl.image_size, PAGE):
        return Advice(False, None, None, default, default, ("the default placement is already safe",))
    written_top = max(r.end for r in best.regions if r.role == "written")
    first = min((r for r in best.regions if r.role == "payload"), key=lambda r: r.start)
    lines = (
        f"kexec {pl.family} default: reserves {pl.image_size:#x} from {rel:#x}; "
        f"{', '.join(c.label for c in default.collisions)}",
        f"highest byte written during decompression/boot: {written_top:#x}",
        f"--image-size {size:#x}: {rel:#x} + ALIGN({size:#x}, 4K) puts the {first.name} at {first.start:#x}"
        f" >= {written_top:#x}"
        if first.start >= written_top
        else f"--image-size {size:#x}: the {first.name} starts at {first.start:#x}, clear of every written region",
        f"one page less ({size - PAGE:#x}) is not safe; any value in [{size - PAGE + 1:#x}, {size:#x}] "
        "has the same effect",
    )
    return Advice(True, size, size - PAGE + 1, default, best, lines)
