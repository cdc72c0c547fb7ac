"""Where to stop and what to dump: the load plan of one kexec -e, from the parsed `kexec --debug` log.

Two hardware breakpoints: kexec's entry (the zImage) and RAM base + TEXT_OFFSET (the decompressed kernel).
The segments kexec copied are dumped at both stops; the free RAM above the kernel segment (the pattern
window) is filled at the first stop, so the second shows how far the decompressor wrote.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..inputs.kexeclog import KexecLog
from ..inputs.zimage import ZImage
from ..oracle import Prediction
from ..oracle.footprint import kernel_address

FILL_ABOVE_FOOTPRINT = 1 << 20  # how far past the oracle's footprint the pattern window reaches
FILL_DEFAULT = 48 << 20  # the window without an oracle footprint


@dataclass(frozen=True)
class SegmentSpec:
    role: str  # kernel | initrd | dtb | other
    start: int
    size: int  # bytes kexec copied (bufsz); the dump covers these
    source: Path | None = None  # the host file this segment was loaded from, for the fidelity check


@dataclass(frozen=True)
class Plan:
    entry: int  # kexec's entry: the zImage
    kernel_entry: int  # RAM base + TEXT_OFFSET (after the fdt_check_mem_start correction)
    text_offset: int
    dtb: int | None
    segments: tuple[SegmentSpec, ...]
    fill: tuple[int, int] | None  # pattern window [start, end), free RAM only
    bootargs: str | None = None  # what the DTB's /chosen/bootargs must say
    regions: tuple[tuple[str, int, int], ...] = ()  # the oracle's layout (name, start, end), RAM excluded
    ram: tuple[int, int] | None = None


def free_window(lo: int, hi: int, taken: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """[lo, hi) minus the taken ranges."""
    out, cur = [], lo
    for s, e in sorted(taken):
        if e <= cur or s >= hi:
            continue
        if s > cur:
            out.append((cur, s))
        cur = max(cur, e)
    if cur < hi:
        out.append((cur, hi))
    return out


def make_plan(
    log: KexecLog,
    zimage: ZImage,
    ram: tuple[int, int],
    prediction: Prediction | None,
    files: dict[str, Path],
    bootargs: str | None,
) -> Plan:
    """Where to stop and what to dump, from the parsed load plan."""
    # The zImage's tag word, else kexec-tools' own assumption (0x8000) when the zImage does not say.
    to = zimage.text_offset if zimage.text_offset is not None else 0x8000
    load = log.kernel.address if log.kernel else log.entry
    entry = log.entry if log.entry is not None else load
    assert load is not None and entry is not None
    kentry = kernel_address(load, to, (ram,))
    roles = {}
    for role, placed in (("kernel", log.kernel), ("initrd", log.initrd), ("dtb", log.dtb)):
        if placed is not None:
            roles[placed.address] = role
    segments = []
    for seg in log.segments:
        if seg.mem is None or not seg.bufsz:
            continue
        role = roles.get(seg.mem, "kernel" if seg.mem == load else "other")
        size = seg.bufsz
        if role == "kernel":
            size = min(size, zimage.size)  # kexec >= 2.0.22 zeroes the 4 bytes past _edata
        segments.append(SegmentSpec(role, seg.mem, size, files.get(role)))
    # The oracle's layout in result.json order (by start, then end), as the post-mortem names regions.
    layout = sorted(prediction.regions, key=lambda r: (r.start, r.end)) if prediction is not None else []
    written = [r.end for r in layout if r.role == "written"]
    footprint_hi = max(written) if written else None
    kseg = next((s for s in segments if s.role == "kernel"), None)
    fill = None
    if kseg is not None:
        lo = (kseg.start + kseg.size + 0xFFF) & ~0xFFF
        if zimage.inflated_size and kentry <= lo < kentry + zimage.inflated_size:
            # The decompressed kernel's text+data is rewritten by design: filling it would cost seconds of
            # gdb writes (the window's bulk) for nothing. The highest write lies above it.
            lo = max(lo, (kentry + zimage.inflated_size) & ~0xFFF)
        hi = min(ram[1], (footprint_hi + FILL_ABOVE_FOOTPRINT) if footprint_hi else lo + FILL_DEFAULT)
        fill = (lo, hi)
    dtb = log.dtb.address if log.dtb else None
    regions = tuple((r.name, r.start, r.end) for r in layout if r.role != "ram")
    return Plan(entry, kentry, to, dtb, tuple(segments), fill, bootargs, regions, ram)
