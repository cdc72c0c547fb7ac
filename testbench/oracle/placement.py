"""Where kexec-tools puts the zImage, initrd and DTB, version by version (DOMAIN.md section 3).

Four rule families of released kexec-tools, and the bench's own fix:
  "<=2.0.12"       initrd at base + ALIGN(4 * file length) (or --image-size), whole file loaded
  "2.0.13-2.0.15"  initrd at kernel_base + ALIGN(5 * Z) (or --image-size), Z = header size
  "2.0.16"         first tag reader: I + B_k
  ">=2.0.17"       max(I + B_k, I + Z + 0x11000), --image-size only ever raises it
  "tag-aware"      >=2.0.17 with images/kexec-patches/arm-zimage-tag-aware.patch: when the KLSZ tag has the
                   TEXT_OFFSET and MALLOC_SIZE words, (TO - 0x8000) + max(I + B_k, I + Z + S + M), S = 0x2000
                   (0x1000 for an EFI stub zImage, whose relocated copy starts a page in); otherwise
                   exactly ">=2.0.17"

`locate_hole` is kexec's first-fit search: the lowest page-aligned address >= min in a System RAM range,
skipping segments already added; `--mem-min`/`--mem-max` clip every range first (kexec.c locate_hole).
The kernel segment is added last, so the initrd and DTB searches only see each other.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import NamedTuple

from ..errors import UserError

PAGE = 0x1000
EXTRA = 0x8000  # kexec-tools' hard-coded TEXT_OFFSET ("extra_size")
DECOMP_EXTRA = 0x11000  # 2.0.17+: 4 KiB stack + 64 KiB malloc for the decompressor
ULONG_MAX = 0xFFFFFFFF
TAG_AWARE = "tag-aware"
FAMILIES = ("<=2.0.12", "2.0.13-2.0.15", "2.0.16", ">=2.0.17", TAG_AWARE)
# tag-aware: the decompressor's 4 KiB stack plus one page for its relocation pad and its own bss, one page
# less for an EFI stub zImage ("MZ" at offset 0), whose copy starts at restart ~0x10a0 instead of ~0xc0
TAG_AWARE_SLACK = 0x2000
TAG_AWARE_EFI_SLACK = 0x1000
DEFAULT_VERSION = "2.0.25"  # Debian 12's kexec-tools: the version assumed when none is given or logged

Ranges = Sequence[tuple[int, int]]


class PlacementError(UserError):
    """kexec-tools itself would refuse this load."""


class Placement(NamedTuple):
    """kexec's decisions. Immutable; a NamedTuple because it is built once per benchmarked layout."""

    family: str
    base: int
    kernel_base: int  # L, where the zImage lands; also the entry point
    kernel_memsz: int  # page-aligned kernel segment size
    image_size: int  # the size kexec reserves for the kernel ("Kernel: size=")
    initrd: tuple[int, int] | None  # (address, size)
    dtb: tuple[int, int] | None


def align_up(x: int, a: int) -> int:
    return (x + a - 1) & -a


def align_down(x: int, a: int) -> int:
    return x & -a


def version_tuple(version: str | None) -> tuple[int, int, int] | None:
    """'2.0.25', 'v2.0.18', '1:2.0.20-2.1' -> (2, 0, 25); None for a family name or no version."""
    m = re.search(r"(\d+)\.(\d+)\.(\d+)", version or "")
    return None if m is None else (int(m.group(1)), int(m.group(2)), int(m.group(3)))


# kexec-tools releases with an ARM defect the placement arithmetic does not show (DOMAIN 9.2)
OPTION_CLASH = ((2, 0, 17), (2, 0, 20))  # ARM's -a/--append/--command-line vs --kexec-syscall-auto (20fea93)
MAGIC_COPY = ((2, 0, 17), (2, 0, 21))  # the 4 bytes after _edata copied from the file (fixed by 9817ec8)


def in_releases(version: str | None, span: tuple[tuple[int, int, int], tuple[int, int, int]]) -> bool:
    t = version_tuple(version)
    return t is not None and span[0] <= t <= span[1]


def option_clash_error(version: str) -> PlacementError:
    return PlacementError(
        f"kexec-tools {version} on ARM cannot take --command-line/--append: their short option 'a' is also "
        "--kexec-syscall-auto, so the file-load path runs without memory ranges and fails with 'Could not find "
        "a free area of memory' (2.0.17-2.0.20; fixed in 2.0.21): leave the command line to the DTB's /chosen "
        "or use kexec-tools >= 2.0.21"
    )


def version_family(version: str) -> str:
    """'2.0.25', 'v2.0.18', '1:2.0.25-3+b1' or a family name -> one of FAMILIES."""
    v = version.strip()
    if v in FAMILIES:
        return v
    m = re.search(r"(\d+)\.(\d+)\.(\d+)", v)
    if m is None:
        raise PlacementError(f"cannot read kexec-tools version {version!r} (expected e.g. 2.0.25)")
    t = tuple(int(x) for x in m.groups())
    if t <= (2, 0, 12):
        return "<=2.0.12"
    if t <= (2, 0, 15):
        return "2.0.13-2.0.15"
    if t == (2, 0, 16):
        return "2.0.16"
    return ">=2.0.17"


def subtract_ranges(pieces: Ranges, cuts: Ranges) -> list[tuple[int, int]]:
    """What is left of [start, end) pieces once every [start, end) cut is taken out of them."""
    left = list(pieces)
    for cs, ce in cuts:
        nxt = []
        for s, e in left:
            if ce <= s or cs >= e:
                nxt.append((s, e))
                continue
            if s < cs:
                nxt.append((s, cs))
            if ce < e:
                nxt.append((ce, e))
        left = nxt
    return left


def locate_hole(
    ram: Ranges, used: Ranges, size: int, min_addr: int, align: int = PAGE, max_addr: int = ULONG_MAX
) -> int | None:
    """Lowest `align`-aligned start >= min_addr of `size` free bytes; None when there is none."""
    for start, end in ram:
        if not used:  # the kernel and initrd searches: nothing added yet
            s = (max(start, min_addr) + align - 1) & -align
            e = min(end, max_addr + 1)
            if e > s and e - s >= size:
                return s
            continue
        for s, e in subtract_ranges([(start, end)], used):
            s = align_up(max(s, min_addr), align)
            e = min(e, max_addr + 1)
            if e > s and e - s >= size:
                return s
    return None


def _hole(
    ram: Ranges, used: Ranges, size: int, min_addr: int, what: str, mem_min: int = 0, mem_max: int = ULONG_MAX
) -> int:
    at = locate_hole(ram, used, size, max(min_addr, mem_min), max_addr=mem_max)
    if at is None:
        clipped = (mem_min, mem_max) != (0, ULONG_MAX)
        window = f" within --mem-min/--mem-max [{mem_min:#x}, {mem_max:#x}]" if clipped else ""
        raise PlacementError(
            f"kexec: could not find a free area of memory of {size:#x} bytes for the {what} above "
            f"{max(min_addr, mem_min):#x}{window}"
        )
    return at


def place(
    ram: Ranges,
    family: str,
    zimage_size: int,
    file_size: int,
    inflated: int | None,
    kernel_bss: int | None,
    image_size: int | None,
    initrd_size: int | None,
    dtb_size: int | None,
    mem_min: int = 0,
    mem_max: int = ULONG_MAX,
    tag_words: tuple[int, int] | None = None,
    efi_stub: bool = False,
) -> Placement:
    """Reproduce kexec-tools' arithmetic. `family` is one of FAMILIES; sizes of None mean 'not given';
    `mem_min`/`mem_max` are kexec's --mem-min/--mem-max (inclusive); `tag_words` the KLSZ tag's
    (TEXT_OFFSET, MALLOC_SIZE) when it has them (only the tag-aware family reads them, and `efi_stub`)."""

    def find(ranges: Ranges, used: Ranges, size: int, min_addr: int, what: str) -> int:
        return _hole(ranges, used, size, min_addr, what, mem_min, mem_max)

    if len(ram) > 1:
        ram = sorted(ram)
    if family == "<=2.0.12":
        length = file_size  # no header clamp before 8d61400
        memsz = align_up(length, PAGE)
    else:
        length = min(file_size, zimage_size)
        memsz = align_up(length + 4, PAGE)  # f11d833: the word after _edata must read as zero
    z = length
    if family in (">=2.0.17", TAG_AWARE):
        length += DECOMP_EXTRA
    base = find(ram, (), length + EXTRA, 0, "kernel")
    kbase = base + EXTRA
    has_tag = inflated is not None and kernel_bss is not None
    if family in (">=2.0.17", TAG_AWARE):
        if has_tag:
            ksize = max(inflated + kernel_bss, inflated + length)  # type: ignore[operator]
            if family == TAG_AWARE and tag_words is not None and tag_words[0] >= EXTRA:
                text_offset, malloc = tag_words
                slack = TAG_AWARE_EFI_SLACK if efi_stub else TAG_AWARE_SLACK
                ksize = text_offset - EXTRA + max(inflated + kernel_bss, inflated + z + slack + malloc)  # type: ignore[operator]
            size = image_size if image_size and image_size >= ksize else ksize
        else:
            size = image_size or length * 5
    elif family == "2.0.16":
        size = image_size or (inflated + kernel_bss if has_tag else length * 5)  # type: ignore[operator]
    elif family == "2.0.13-2.0.15":
        size = image_size or length * 5
    else:
        size = image_size or length * 4
    initrd = dtb = None
    initrd_len = initrd_size or 0
    if family in ("<=2.0.12", "2.0.13-2.0.15"):
        # Before 34bf700 the initrd and DTB were placed as one hole, the DTB a page after the initrd.
        initrd_base = (base if family == "<=2.0.12" else kbase) + align_up(size, PAGE)
        if dtb_size is not None:
            hole = align_up(initrd_len, PAGE) + align_up(dtb_size + PAGE, PAGE)
            initrd_base = find(ram, (), hole, initrd_base, "initrd and DTB")
            dtb = (align_down(initrd_base + initrd_len + PAGE, PAGE), dtb_size)
        elif initrd_len:
            initrd_base = find(ram, (), initrd_len, initrd_base, "initrd")
        if initrd_len:
            initrd = (initrd_base, initrd_len)
    else:
        initrd_base = kbase + align_up(size, PAGE)
        used: list[tuple[int, int]] = []
        if initrd_len:
            initrd_base = find(ram, (), initrd_len, initrd_base, "initrd")
            initrd = (initrd_base, initrd_len)
            used.append((initrd_base, initrd_base + align_up(initrd_len, PAGE)))
        if dtb_size is not None:
            dmin = align_down(initrd_base + initrd_len + PAGE, PAGE)
            dtb = (find(ram, used, dtb_size, dmin, "DTB"), dtb_size)
    # sort_segments refuses overlapping segments; only a too-small --image-size can cause it
    kend = kbase + memsz
    for name, seg in (("initrd", initrd), ("DTB", dtb)):
        if seg is not None and seg[0] < kend and kbase < seg[0] + align_up(seg[1], PAGE):
            raise PlacementError(
                f"kexec would refuse the load: the kernel and {name} segments overlap "
                f"(--image-size {size:#x} is smaller than the kernel)"
            )
    if initrd and dtb and dtb[0] < initrd[0] + align_up(initrd[1], PAGE) and initrd[0] < dtb[0] + dtb[1]:
        raise PlacementError("kexec would refuse the load: the initrd and DTB segments overlap")
    return Placement(family, base, kbase, memsz, size, initrd, dtb)
