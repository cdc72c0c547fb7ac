"""Synthetic zImages for the unit tests, built from the layout in DOMAIN.md (a plain module, not the
conftest, so test modules can import it whatever other conftest.py files the same run collects)."""

from __future__ import annotations

import struct
from pathlib import Path

DATA = Path(__file__).parent / "data"
KLSZ = 0x5A534C4B


def build_zimage(
    z: int = 0x8000,
    tag_words: int | None = 6,
    inflated: int = 0x123457,
    kbss: int = 0x5E4D4,
    text_offset: int = 0x208000,
    malloc: int = 0x10000,
    efi: bool = False,
    thumb2: bool = False,
    restart: int = 0x10B4,
    pad: int | None = 0x900,
    dbss: int = 0x418,
    lc0_layout: str = "new",
    appended_dtb: int | None = None,
    table: int = 0x2F0,
    wont_overwrite: int | None = None,
) -> bytes:
    """A zImage with the header, tag table, LC0/LC1 literals and relocation instructions of DOMAIN.md.

    The inflated size sits at an odd (unaligned) offset, as in the Debian kernel.
    """
    b = bytearray(z)

    def put(off: int, *words: int) -> None:
        struct.pack_into(f"<{len(words)}I", b, off, *words)

    put(0, *[0xE1A00000] * 7)
    if efi:
        put(0, 0xE2255A4D)  # "MZ" + ARM-harmless instruction, as in Debian's EFI stub build
    if thumb2:
        put(0x1C, 0xE24FF003, 0xF000B800)
    else:
        put(0x1C, 0xE1A00000, 0xEA0003F6)
    put(0x24, 0x016F2818, 0, z, 0x04030201, 0x45454545, table)
    size_ptr = z - 0x1FF
    if tag_words is not None:
        payload = [size_ptr, kbss, text_offset, malloc][: max(tag_words - 2, 2)]
        put(table, tag_words, KLSZ, *payload, 0)
        put(size_ptr, inflated)
    lc0 = 0x1310
    end = z + dbss
    stack_end = ((end + 7) & ~7) + 4096
    headroom = end - restart + 16384 + 0x100000
    if lc0_layout == "new":
        put(lc0, lc0, z, end, z - 0x200, z - 0x1D8, stack_end - (lc0 + 20), z - (lc0 + 20), headroom)
    else:  # <= v5.8: {LC0, __bss_start, _end, _edata, input_data_end-4, got, got, stack_end, headroom}
        put(lc0, lc0, z, end, z, size_ptr, z - 0x200, z - 0x1D8, stack_end, headroom)
    if pad is not None:
        imm = pad >> 8  # pad is a multiple of 256: imm8 rotated right by 24
        put(0x11B0, 0xE28AAC00 | imm, 0xE3CAA0FF)
    if wont_overwrite is not None:
        # add r10, r4, r9; adr r9, wont_overwrite; cmp r10, r9 -- where Debian's 6.1 zImage has them
        put(0x11A0, 0xE084A009, 0xE28F9000 | (wont_overwrite - (0x11A4 + 8)), 0xE15A0009)
    if appended_dtb is not None:
        dtb = bytearray(appended_dtb)
        struct.pack_into(">II", dtb, 0, 0xD00DFEED, appended_dtb)
        b += dtb
    return bytes(b)
