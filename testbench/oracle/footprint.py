"""What the decompressor and the kernel write, given where kexec put the zImage (DOMAIN.md 2.1-2.5).

All inputs are concrete integers; the handling of unknown values (ranges, assumptions) lives in
predict.py. Regions are returned as (name, start, end_exclusive) tuples because this is the hot path of
the benchmark; predict.py wraps them into `Region` objects.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

PGDIR = 0x4000  # 16 KiB first-level page table below the kernel
SZ_2M = 0x200000
# wont_overwrite - restart when the binary does not say: 0x1228 - 0x10b4 in Debian's 6.1 and 6.12 zImages
# (DOMAIN 9.3); Debian's 5.10 has 0x1218 - 0x1088 = 0x190
WONT_OVERWRITE_GAP = 0x174
FALLBACK_SINCE = (5, 12)  # fdt_check_mem_start, 0673cb389512 (DOMAIN 9.3)


@dataclass(frozen=True, slots=True)
class Decomp:
    """Concrete decompressor constants, as link offsets (file offsets for a PIC zImage)."""

    z: int  # _edata (== hdr.end - hdr.start)
    restart: int  # R; only R & ~31 matters
    reloc_pad: int  # P
    bss_start: int
    bss_end: int  # E
    stack_end: int  # S
    malloc_size: int = 0x10000  # M
    dtb8: int = 0  # appended DTB the decompressor will use, rounded to 8 (0 when none)
    wont_overwrite: int | None = None  # W; None: restart + WONT_OVERWRITE_GAP
    appended: bool = False  # the FDT magic follows _edata, so head.S takes the appended-DTB path

    @property
    def w(self) -> int:
        return self.wont_overwrite if self.wont_overwrite is not None else self.restart + WONT_OVERWRITE_GAP


def kernel_address(load: int, text_offset: int, memory: Sequence[tuple[int, int]] | None, fallback: bool = True) -> int:
    """AUTO_ZRELADDR: r4 = (pc & 0xf8000000) + TEXT_OFFSET.

    `memory` is the DTB's /memory (what fdt_check_mem_start reads; a NOMAP region moves /proc/iomem's
    System RAM, not /memory). If the 128 MiB-aligned guess is not in it, Linux >= 5.12 (`fallback`) uses the
    lowest memory base rounded up to 2 MiB; older kernels keep the guess, outside RAM, and never boot.
    """
    guess = load & 0xF8000000
    if memory and fallback:
        for s, e in memory:
            if s <= guess < e:
                return guess + text_offset
        guess = (min(s for s, _ in memory) + SZ_2M - 1) & -SZ_2M
    return guess + text_offset


def has_fallback(kernel_version: str | None) -> bool | None:
    """Whether a kernel of this version ('6.1.0-57-armmp', '5.10.223-1', 'Linux version 5.6.0-rc1') has the
    kernel_address fallback; None when the version cannot be read."""
    import re

    m = re.search(r"(\d+)\.(\d+)", kernel_version or "")
    if m is None:
        return None
    return (int(m.group(1)), int(m.group(2))) >= FALLBACK_SINCE


def footprint(
    load: int, kaddr: int, inflated: int, kernel_bss: int, d: Decomp, copy: tuple[int, int, int] | None = None
) -> list[tuple[str, int, int]]:
    """Written regions during decompression and early boot.

    `copy` = (src_start, dst_start, dst_end) from an observed `C:` line overrides the computed copy.
    """
    out = [
        ("pagetables", (kaddr - PGDIR) & ~(PGDIR - 1), kaddr),
        ("kernel", kaddr, kaddr + inflated),
        ("kernel.bss", kaddr + inflated, kaddr + inflated + kernel_bss),
    ]
    stack_lo = (d.bss_end + 7) & ~7
    arena_end = load + d.stack_end + d.dtb8 + d.malloc_size  # r10 at the first pass through restart
    r9 = inflated
    if d.dtb8 or d.appended:
        # head.S 6.1:428-432: grow r9 so the relocated appended DTB does not land in the kernel's bss; r6 is
        # still _edata there (the DTB size is added after), so the code above wont_overwrite is what counts
        r9 += max(0, kernel_bss - (d.z - d.w))
    # head.S 6.1:450-456: no relocation when the kernel and its page directory lie above the whole
    # footprint, or when the decompressed kernel ends below wont_overwrite
    relocate = not (kaddr >= arena_end + PGDIR or kaddr + r9 <= load + d.w)
    if not relocate and copy is None:
        delta = 0
    else:
        if copy is not None:
            r5, dest, dest_end = copy
        else:
            dest = (kaddr + r9 + d.reloc_pad) & ~255
            r5 = (load + d.restart) & ~31
            dest_end = dest + ((load + d.z + d.dtb8 - r5 + 31) & ~31)
        delta = dest - r5
        out.append(("decompressor.copy", dest, dest_end))
    base = load + delta + d.dtb8
    out.append(("decompressor.bss", base + d.bss_start, base + d.bss_end))
    out.append(("decompressor.stack", base + stack_lo, base + d.stack_end))
    out.append(("decompressor.malloc", base + d.stack_end, base + d.stack_end + d.malloc_size))
    return out
