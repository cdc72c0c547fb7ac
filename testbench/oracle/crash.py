"""Crash kernels (`kexec -p`): where kexec-tools puts them, where their decompressor puts the kernel, and
what that writes over, inside and outside the reservation. Pure functions, no I/O.

kexec-tools, kexec/arch/arm/kexec-zImage-arm.c and crashdump-arm.c (2.0.25; the same since 2.0.10,
DOMAIN 9.2):
  base        the start of the "Crash kernel" range of /proc/iomem (no locate_hole for the kernel)
  kernel      base + 0x8000, the image size by the loader's rule family (as for `kexec -l`)
  initrd      kernel + ALIGN(image size, 4K), fixed: "The crash kernel use fixed address, so no check"
  DTB         ALIGN_DOWN(initrd + initrd size + 4K, 4K), fixed likewise
  elfcorehdr  added first, top down: the highest 1 MiB-aligned address of the region that holds it
              (2 MiB for a 64-bit header since 2.0.29, 2a3e54e)
  command line  the given one + " elfcorehdr=%#lx" + " mem=%ldK" with mem = elfcorehdr - base
Nothing checks the initrd and DTB against the region: the kernel's kexec_load refuses a crash segment
outside crashk_res (EADDRNOTAVAIL), and sort_segments one that overlaps the elfcorehdr.

The crash kernel's decompressor (arch/arm/boot/compressed/head.S, fdt_check_mem_start.c):
  Linux >= 5.16 (48342ae751c7) with kexec-tools >= 2.0.23 (5f8d632: /chosen/linux,usable-memory-range)
      K = round_up(max(/memory base, usable base), 2 MiB) + TEXT_OFFSET: inside the reservation
  otherwise K = (PC & 0xF8000000) + TEXT_OFFSET (the 5.12 fallback only when that is outside /memory):
      below the reservation unless it starts on a 128 MiB boundary
Everything written outside the reservation is the crashed kernel's memory: lost to /proc/vmcore.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

from ..inputs.kexeclog import KexecLog
from ..inputs.zimage import ZImage
from .analyze import analyze, place_zimage
from .collide import Collision, find_collisions
from .footprint import SZ_2M, has_fallback
from .placement import PAGE, Placement, PlacementError, align_down, align_up, version_tuple
from .predict import Prediction

CRASH_KERNEL = "Crash kernel"
ELFCOREHDR_ALIGN = 1 << 20  # SECTION_SIZE: the crash kernel's create_mapping wants mem= on 1 MiB
ELFCOREHDR_ALIGN_64 = 2 << 20  # 2a3e54e (2.0.29): 64-bit (LPAE) core headers on 2 MiB
ELFCOREHDR_64_SINCE = (2, 0, 29)
ELFCOREHDR_SIZE = 0x1000  # Ehdr + a few Phdrs, far below the alignment: only its page counts
USABLE_RANGE_KEXEC = (2, 0, 23)  # 5f8d632: the crash DTB gets linux,usable-memory-range
USABLE_RANGE_LINUX = (5, 16)  # 48342ae751c7: the decompressor reads it
TOP = 0x1_0000_0000
LOST = "the crashed kernel's memory there is lost to vmcore"


@dataclass(frozen=True)
class CrashRegion:
    start: int
    end: int  # exclusive

    @property
    def size(self) -> int:
        return self.end - self.start

    def label(self) -> str:
        return f"[{self.start:#x}, {self.end:#x})"


def crash_region(iomem: str) -> CrashRegion | None:
    """The "Crash kernel" range of a /proc/iomem text (kexec-tools' parse_iomem_single), or None."""
    for line in iomem.splitlines():
        m = re.match(r"\s*([0-9a-fA-F]+)-([0-9a-fA-F]+)\s*:\s*(.+?)\s*$", line)
        if m and m.group(3) == CRASH_KERNEL:
            return CrashRegion(int(m.group(1), 16), int(m.group(2), 16) + 1)
    return None


@dataclass(frozen=True)
class CrashPlacement:
    region: CrashRegion
    placement: Placement  # kernel, image size, initrd and DTB as for any load, at the region's offsets
    elfcorehdr: tuple[int, int]  # (address, size)

    @property
    def mem_kib(self) -> int:
        return (self.elfcorehdr[0] - self.region.start) >> 10

    @property
    def cmdline_words(self) -> tuple[str, str]:
        """What kexec appends to the crash kernel's command line (cmdline_add_elfcorehdr, cmdline_add_mem)."""
        return (f"elfcorehdr={self.elfcorehdr[0]:#x}", f"mem={self.mem_kib}K")

    def refusals(self) -> tuple[str, ...]:
        """Why the load itself fails: kexec does not check the fixed crash offsets, the kernel does."""
        out = []
        pl, r = self.placement, self.region
        segments = [("kernel", pl.kernel_base, pl.kernel_memsz)]
        segments += [(n, s[0], s[1]) for n, s in (("initrd", pl.initrd), ("DTB", pl.dtb)) if s is not None]
        # kexec's own sort_segments check comes first ("Overlapping memory segments"), the kernel's after
        hdr = self.elfcorehdr[0]
        for name, start, size in segments:
            if start < hdr + align_up(self.elfcorehdr[1], PAGE) and hdr < start + align_up(size, PAGE):
                out.append(
                    f"the {name} segment overlaps the elfcorehdr at {hdr:#x} (the top of the crash region "
                    f"{r.label()}): kexec refuses (Overlapping memory segments)"
                )
        for name, start, size in segments:
            end = start + align_up(size, PAGE)
            if end > r.end:
                out.append(
                    f"the {name} segment [{start:#x}, {end:#x}) ends outside the crash region {r.label()}: "
                    "the kernel refuses it (kexec_load: Cannot assign requested address)"
                )
        return tuple(out)


def elfcorehdr_address(region: CrashRegion, size: int, align: int = ELFCOREHDR_ALIGN) -> int:
    """add_buffer_phys_virt(..., align, crash start, crash end, top down): the highest aligned start."""
    return align_down(region.end - size, align)


def elfcorehdr_align(kexec_version: str | None, elf64: bool) -> int:
    t = version_tuple(kexec_version)
    return ELFCOREHDR_ALIGN_64 if elf64 and t is not None and t >= ELFCOREHDR_64_SINCE else ELFCOREHDR_ALIGN


def crash_place(
    region: CrashRegion,
    zimage: ZImage,
    family: str,
    *,
    image_size: int | None = None,
    initrd_size: int | None = None,
    dtb_size: int | None = None,
    elfcorehdr_size: int = ELFCOREHDR_SIZE,
    elfcorehdr_align: int = ELFCOREHDR_ALIGN,
) -> CrashPlacement:
    """kexec -p's placement. `place()` over one range from the region's start upwards reproduces the fixed
    offsets exactly: with nothing added before them, its first fit is the minimum it is given."""
    pl = place_zimage(zimage, ((region.start, TOP),), family, image_size, initrd_size, dtb_size)
    hdr = elfcorehdr_address(region, elfcorehdr_size, elfcorehdr_align)
    return CrashPlacement(region, pl, (hdr, elfcorehdr_size))


def uses_usable_range(kernel_version: str | None, kexec_version: str | None) -> bool | None:
    """Whether the crash kernel's decompressor reads linux,usable-memory-range; None: cannot tell."""
    linux = re.search(r"(\d+)\.(\d+)", kernel_version or "")
    kexec = version_tuple(kexec_version)
    if linux is None or kexec is None:
        return None
    return (int(linux.group(1)), int(linux.group(2))) >= USABLE_RANGE_LINUX and kexec >= USABLE_RANGE_KEXEC


def crash_kernel_address(
    region: CrashRegion, load: int, text_offset: int, memory: Sequence[tuple[int, int]], usable: bool, fallback: bool
) -> int:
    """Where the crash kernel's decompressor puts the kernel (fdt_check_mem_start, head.S)."""
    if usable:
        bases = [max(s, region.start) for s, e in memory if min(e, region.end) > max(s, region.start)]
        return align_up(min(bases) if bases else region.start, SZ_2M) + text_offset
    guess = load & 0xF8000000
    if fallback and memory and not any(s <= guess < e for s, e in memory):
        guess = align_up(min(s for s, _ in memory), SZ_2M)
    return guess + text_offset


@dataclass(frozen=True)
class OutsideWrite:
    start: int
    end: int
    regions: tuple[str, ...]  # the written regions it comes from

    @property
    def finding(self) -> str:
        return (
            f"decompressor writes [{self.start:#x}, {self.end:#x}) outside the crash region "
            f"({', '.join(self.regions)}): {LOST}"
        )

    def to_dict(self) -> dict:
        return {"start": self.start, "end": self.end, "regions": list(self.regions), "finding": self.finding}


@dataclass(frozen=True)
class CrashPrediction:
    region: CrashRegion
    kernel_address: int
    address_rule: str
    prediction: Prediction  # collisions with the initrd and DTB at that kernel address
    elfcorehdr: tuple[int, int] | None
    elfcorehdr_hits: tuple[Collision, ...]
    outside: tuple[OutsideWrite, ...]
    crash_ram: tuple[int, int] | None = None  # the crash kernel's RAM: mem= from its PHYS_OFFSET (K - TO)
    lost: tuple[str, ...] = ()  # payloads outside that RAM, which the crash kernel drops

    @property
    def fatal(self) -> bool:
        return self.prediction.fatal or bool(self.lost) or any(c.severity == "fatal" for c in self.elfcorehdr_hits)

    @property
    def verdict(self) -> str:
        """collision (the crash kernel cannot boot), outside (it boots, the dump is damaged), else the
        static oracle's safe or unknown."""
        if self.fatal:
            return "collision"
        if self.outside:
            return "outside"
        return self.prediction.verdict

    def findings(self) -> tuple[str, ...]:
        cols = [c for c in (*self.prediction.collisions, *self.elfcorehdr_hits) if c.severity == "fatal"]
        lost = (f"oracle: {x}" for x in self.lost)
        return (*(f"oracle: {c.label} fatal" for c in cols), *lost, *(w.finding for w in self.outside))

    def to_dict(self) -> dict:
        return {
            "verdict": self.verdict,
            "region": [self.region.start, self.region.end],
            "kernel_address": self.kernel_address,
            "address_rule": self.address_rule,
            "elfcorehdr": list(self.elfcorehdr) if self.elfcorehdr else None,
            "elfcorehdr_collisions": [c.to_dict() for c in self.elfcorehdr_hits],
            "outside_writes": [w.to_dict() for w in self.outside],
            "crash_ram": list(self.crash_ram) if self.crash_ram else None,
            "lost_payloads": list(self.lost),
            "findings": list(self.findings()),
            "static": self.prediction.to_dict(),
        }


def outside_writes(written: Sequence[tuple[str, int, int]], region: CrashRegion) -> tuple[OutsideWrite, ...]:
    """The written bytes outside the region, merged into contiguous ranges naming their sources."""
    pieces: list[tuple[int, int, str]] = []
    for name, s, e in written:
        if s < region.start:
            pieces.append((s, min(e, region.start), name))
        if e > region.end:
            pieces.append((max(s, region.end), e, name))
    merged: list[OutsideWrite] = []
    for s, e, name in sorted(p for p in pieces if p[1] > p[0]):
        if merged and s <= merged[-1].end:
            last = merged[-1]
            names = last.regions + ((name,) if name not in last.regions else ())
            merged[-1] = OutsideWrite(last.start, max(last.end, e), names)
        else:
            merged.append(OutsideWrite(s, e, (name,)))
    return tuple(merged)


def judge_crash(
    log: KexecLog,
    region: CrashRegion,
    zimage: ZImage,
    ram: Sequence[tuple[int, int]],
    *,
    kernel_version: str | None,
    kexec_version: str | None,
    elfcorehdr: tuple[int, int] | None = None,
) -> CrashPrediction:
    """The static oracle on the crash load kexec printed: `analyze` with the crash kernel's own address
    rule, plus the elfcorehdr as a payload and the writes outside the region."""
    to = zimage.text_offset if zimage.text_offset is not None else 0x8000
    load = log.kernel.address if log.kernel else log.entry
    if load is None:
        raise PlacementError("the kexec -p log has neither a 'Kernel:' line nor an entry address")
    usable = uses_usable_range(kernel_version, kexec_version)
    fallback = bool(has_fallback(kernel_version))
    kaddr = crash_kernel_address(region, load, to, ram, bool(usable), fallback)
    rule = (
        "round_up(crash start, 2 MiB) + TEXT_OFFSET (linux,usable-memory-range: Linux >= 5.16, kexec >= 2.0.23)"
        if usable
        else "(PC & 0xF8000000) + TEXT_OFFSET (no linux,usable-memory-range reader)"
    )
    # The log's MEMORY RANGES of a crash load also list the reserved and coredump ranges: RAM is the machine's
    clean = replace(log, memory_ranges=tuple(sorted(ram)))
    # analyze() takes the kernel address from /memory; the one-range /memory [K - TO, end) gives exactly K.
    p = analyze(
        clean,
        zimage,
        to,
        kexec_version,
        kernel_version=kernel_version,
        memory=((kaddr - to, max(e for _, e in ram)),),
    )
    written = [(r.name, r.start, r.end) for r in p.regions if r.role == "written"]
    hits: tuple[Collision, ...] = ()
    if elfcorehdr is not None:
        hdr = [("elfcorehdr", elfcorehdr[0], elfcorehdr[0] + elfcorehdr[1])]
        hits = tuple(find_collisions(written, hdr, None))
    crash_ram = lost = None
    if elfcorehdr is not None:
        crash_ram, lost = crash_kernel_ram(region, kaddr - to, elfcorehdr[0], bool(usable), log)
    return CrashPrediction(
        region, kaddr, rule, p, elfcorehdr, hits, outside_writes(written, region), crash_ram, lost or ()
    )


def crash_kernel_ram(
    region: CrashRegion, phys_offset: int, elfcorehdr: int, usable: bool, log: KexecLog
) -> tuple[tuple[int, int], tuple[str, ...]]:
    """ARM's mem=SIZE keeps [PHYS_OFFSET, +SIZE), PHYS_OFFSET being where the crash kernel runs (K - TO);
    a usable-memory-range reader also caps it to the region. An initrd outside that RAM is dropped
    ("INITRD: ... is not a memory region - disabling initrd")."""
    mem = elfcorehdr - region.start
    lo, hi = phys_offset, phys_offset + mem
    if usable:
        lo, hi = max(lo, region.start), min(hi, region.end)
    lost = []
    if log.initrd is not None:
        s, e = log.initrd.address, log.initrd.address + log.initrd.size
        if not (lo <= s and e <= hi):
            lost.append(
                f"initrd [{s:#x}, {e:#x}) lies outside the crash kernel's RAM [{lo:#x}, {hi:#x}) (mem={mem >> 10}K "
                f"from PHYS_OFFSET {phys_offset:#x}): the kernel disables the initrd"
            )
    return (lo, hi), tuple(lost)
