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


def kernel_address(load: int, text_offset: int, ram: Sequence[tuple[int, int]] | None) -> int:
    """AUTO_ZRELADDR: r4 = (pc & 0xf8000000) + TEXT_OFFSET.

    If that 128 MiB-aligned guess is not RAM, fdt_check_mem_start (v5.15+) falls back to the lowest RAM
    base rounded up to 2 MiB; older kernels would simply use the guess and fail to boot either way.
    """
    guess = load & 0xF8000000
    if ram:
        for s, e in ram:
            if s <= guess < e:
                return guess + text_offset
        guess = (min(s for s, _ in ram) + SZ_2M - 1) & -SZ_2M
    return guess + text_offset


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
    if d.dtb8:
        # head.S: grow r9 so the relocated appended DTB does not land in the kernel's bss
        r9 += max(0, kernel_bss - (d.z + d.dtb8 - d.restart))
    relocate = not (kaddr >= arena_end + PGDIR or kaddr + r9 <= load + d.restart)
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
