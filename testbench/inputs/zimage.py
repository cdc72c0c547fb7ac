"""Read a 32-bit ARM zImage: header, KLSZ tag table, and the decompressor constants the oracle needs.

Everything here follows /work/shared/DOMAIN.md sections 1 and 2.4. Offsets are file offsets of the zImage
payload (after stripping a uImage header or gzip wrapper, see `ZImage.container`).

Decompressor constants (all link offsets, i.e. file offsets for a PIC zImage):
  restart     R   label where "will I overwrite myself?" starts; only `R & ~31` onwards is copied
  reloc_pad   P   (reloc_code_end - restart + 256) & ~255, the gap left above the decompressed kernel
  bss_start       decompressor __bss_start (== _edata == Z for every kernel we know)
  bss_end     E   decompressor _end
  stack_end   S   .L_user_stack_end = ALIGN8(E) + 4096; the 64 KiB malloc arena starts here
  wont_overwrite W  the label the "will I overwrite myself" test and the appended-DTB bss adjustment
                  compare against (head.S 6.1:428-432, 454-456); Debian 6.1: W - R = 0x174

They are scanned from the binary (LC0/LC1/.Lheadroom literals, the `add sl, sl, #P; bic sl, sl, #255`
pair, and `adr r9, wont_overwrite` between `add r10, r4, r9` and `cmp r10, r9`) or read exactly from ELF
files (`decompressor_elf=`, `vmlinux=`). A constant that cannot be found is None and `notes` says why:
Thumb-2 builds give no P or W, because the ARM encoding we decode is absent there.
"""

from __future__ import annotations

import gzip
import io
import struct
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

from ..errors import UserError

ZIMAGE_MAGIC = 0x016F2818
MAGIC2 = 0x45454545
KLSZ = 0x5A534C4B
FDT_MAGIC = 0xD00DFEED
UIMAGE_MAGIC = 0x27051956
ENDIAN_LE = 0x04030201
ENDIAN_BE = 0x01020304

_ARM_BIC_SL_255 = 0xE3CAA0FF  # bic sl, sl, #255
_ARM_ADD_SL_IMM = 0xE28AA000  # add sl, sl, #imm12 (mask 0xfffff000)
_ARM_ADD_R10_R4_R9 = 0xE084A009  # add r10, r4, r9: kernel end, just before `adr r9, wont_overwrite`
_ARM_ADR_R9 = 0xE28F9000  # add r9, pc, #imm12 (mask 0xfffff000): `adr r9, wont_overwrite`
_ARM_CMP_R10_R9 = 0xE15A0009  # cmp r10, r9
_THUMB_SWITCH = 0xE24FF003  # sub pc, pc, #3: the Thumb-2 kernel's switch out of ARM state
_MAX_GUNZIP = 256 << 20  # a gzip-wrapped zImage bigger than this is not a kernel
_MAX_INFLATED = 1 << 30  # a 32-bit ARM kernel image inflating to 1 GiB or more cannot be placed in lowmem


class ZImageError(UserError):
    """The file is not a readable ARM zImage."""


@dataclass(frozen=True)
class ZImage:
    file_size: int  # bytes of the file as given
    container: str  # "zimage", "uimage" (64-byte mkimage header stripped) or "gzip" (inflated first)
    data_size: int  # bytes of the zImage payload after unwrapping
    magic_start: int
    magic_end: int
    endian: str  # "le", "be" or "unknown" (no 0x04030201 word)
    efi_stub: bool
    thumb2: bool
    table_offset: int | None = None
    tag_words: int | None = None  # KLSZ size word: 2, 3, 4, 5 or 6
    size_ptr: int | None = None
    inflated_size: int | None = None  # I
    kernel_bss: int | None = None  # B_k
    text_offset: int | None = None  # TO, tag word +16 (>= v5.10) or vmlinux
    malloc_size: int | None = None  # M, tag word +20 (>= v5.10)
    appended_dtb_size: int | None = None  # FDT totalsize found at offset Z
    restart: int | None = None
    reloc_pad: int | None = None
    bss_start: int | None = None
    bss_end: int | None = None
    stack_end: int | None = None
    wont_overwrite: int | None = None
    notes: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        """Z = end - start: what kexec-tools loads (an appended DTB is cut off)."""
        return self.magic_end - self.magic_start

    @property
    def has_tag(self) -> bool:
        return self.inflated_size is not None

    @property
    def decompressor_bss(self) -> int | None:
        if self.bss_start is None or self.bss_end is None:
            return None
        return self.bss_end - self.bss_start

    def to_dict(self) -> dict:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["size"] = self.size
        out["notes"] = list(self.notes)
        return out


def _u32(buf: bytes, off: int, big: bool = False) -> int:
    return struct.unpack_from(">I" if big else "<I", buf, off)[0]


def _unwrap(raw: bytes) -> tuple[str, bytes, list[str]]:
    """Strip a uImage header or inflate a gzip file; kexec-tools itself does the latter ("Try gzip")."""
    notes: list[str] = []
    if len(raw) >= 64 and _u32(raw, 0, big=True) == UIMAGE_MAGIC:
        size = _u32(raw, 12, big=True)
        notes.append(f"uImage (mkimage) wrapper of 64 bytes, payload {size:#x} bytes; analysed the payload")
        return "uimage", raw[64 : 64 + size], notes
    if raw[:2] == b"\x1f\x8b":
        try:
            with gzip.GzipFile(fileobj=io.BytesIO(raw)) as gz:
                data = gz.read(_MAX_GUNZIP + 1)
        except (OSError, EOFError, zlib.error) as exc:
            raise ZImageError(f"gzip-compressed file does not inflate: {exc}") from None
        if len(data) > _MAX_GUNZIP:
            raise ZImageError("gzip-compressed file inflates to more than 256 MiB; not a zImage")
        notes.append("gzip-compressed file; kexec-tools inflates it first, so did we")
        return "gzip", data, notes
    return "zimage", raw, notes


def _arm_imm(insn: int) -> int:
    """Decode an ARM data-processing modified immediate: imm8 rotated right by 2*rot."""
    imm8, rot = insn & 0xFF, ((insn >> 8) & 0xF) * 2
    return ((imm8 >> rot) | (imm8 << (32 - rot))) & 0xFFFFFFFF if rot else imm8


def _scan_reloc_pad(buf: bytes) -> int | None:
    pat = struct.pack("<I", _ARM_BIC_SL_255)
    at = buf.find(pat, 4)
    while at != -1:
        if at % 4 == 0:
            prev = _u32(buf, at - 4)
            if prev & 0xFFFFF000 == _ARM_ADD_SL_IMM:
                return _arm_imm(prev)
        at = buf.find(pat, at + 1)
    return None


def _scan_wont_overwrite(buf: bytes) -> int | None:
    """W from `add r10, r4, r9; adr r9, wont_overwrite; cmp r10, r9` (head.S "will I overwrite myself")."""
    pat = struct.pack("<I", _ARM_ADD_R10_R4_R9)
    at = buf.find(pat)
    while at != -1:
        if at % 4 == 0 and at + 12 <= len(buf):
            adr, cmp = _u32(buf, at + 4), _u32(buf, at + 8)
            if adr & 0xFFFFF000 == _ARM_ADR_R9 and cmp == _ARM_CMP_R10_R9:
                return at + 4 + 8 + _arm_imm(adr)  # ARM: pc reads as the instruction's address + 8
        at = buf.find(pat, at + 1)
    return None


def _scan_lc0(buf: bytes, start: int, z: int, big: bool) -> tuple[int, int, int | None, int | None] | None:
    """Find LC0 = {LC0, __bss_start, _end, ...}; return (offset, _end, stack_end, restart).

    LC0's first word is its own link address, the second __bss_start (== _edata == Z), the third _end.
    The stack end follows either absolutely (kernels <= ~5.9) or LC1-relative (Ard Biesheuvel's 2020
    cleanup); .Lheadroom = _end - restart + 16 KiB + 1 MiB follows within a few words and gives restart.
    """
    limit = min(len(buf), z) - 48
    for off in range(0x24, max(limit, 0), 4):
        if _u32(buf, off, big) != start + off or _u32(buf, off + 4, big) != start + z:
            continue
        end = _u32(buf, off + 8, big) - start
        if not z < end <= z + 0x10000:
            continue
        # Known layouts: LC1 = {stack_end - LC1, _edata - LC1} at +20 (2020 cleanup), absolute stack end at
        # +24 (after input_data_end-4 was dropped) or +28 (older); .Lheadroom at +28 or +32.
        stack = restart = None
        for k, relative in ((20, True), (24, False), (28, False)):
            w = _u32(buf, off + k, big)
            cand = (w + off + k) & 0xFFFFFFFF if relative else w - start
            if end < cand <= end + 0x2000 and cand % 8 == 0:
                stack = cand
                break
        for k in (28, 32):
            r = end + 16384 + 0x100000 - _u32(buf, off + k, big)
            if 0x24 < r < min(z, 0x8000) and r % 4 == 0:
                restart = r
                break
        return off, end, stack, restart
    return None


def _find_tag(buf: bytes, table: int) -> tuple[int, list[int]] | None:
    """Walk ATAG-style {size_words, tag, payload...} records until a zero word; return (words, payload)."""
    off = table
    for _ in range(64):
        if off + 8 > len(buf):
            return None
        words, tag = _u32(buf, off), _u32(buf, off + 4)
        if words == 0:
            return None
        if tag == KLSZ:
            n = max(words, 4)  # kexec-tools reads +8/+12 whatever the size word says (DOMAIN 1.2)
            if off + 4 * n > len(buf):
                n = (len(buf) - off) // 4
            return words, [_u32(buf, off + 4 * i) for i in range(2, n)]
        if words > 64:
            return None
        off += 4 * words
    return None


def parse_zimage(raw: bytes) -> ZImage:
    """Parse zImage bytes. Raises ZImageError for anything that is not an ARM zImage."""
    container, buf, notes = _unwrap(bytes(raw))
    if len(buf) < 0x30:
        raise ZImageError(f"file too short for a zImage header ({len(buf)} bytes)")
    if _u32(buf, 0x24) != ZIMAGE_MAGIC:
        raise ZImageError(f"no zImage magic 0x016f2818 at offset 0x24 (found {_u32(buf, 0x24):#010x})")
    start, end = _u32(buf, 0x28), _u32(buf, 0x2C)
    z = end - start
    if z <= 0x30 or z > len(buf):
        raise ZImageError(
            f"zImage header says {z:#x} bytes (start {start:#x}, end {end:#x}) but the file has {len(buf):#x}"
        )
    flag = _u32(buf, 0x30) if len(buf) >= 0x34 else 0
    endian = {ENDIAN_LE: "le", ENDIAN_BE: "be"}.get(flag, "unknown")
    big = endian == "be"
    efi = buf[:2] == b"MZ"
    thumb2 = _u32(buf, 0x1C) == _THUMB_SWITCH or (_u32(buf, 0x20) >> 24) != 0xEA
    fields: dict = {}
    if len(buf) >= 0x3C and _u32(buf, 0x34) == MAGIC2:
        table = _u32(buf, 0x38)
        fields["table_offset"] = table
        # magic2 promises a table (v4.15+ vmlinux.lds.S always emits KLSZ in it): a missing or inconsistent
        # tag is a damaged file, and kexec-tools would size the kernel from garbage, so refuse it.
        found = _find_tag(buf, table) if table < len(buf) else None
        if found is None:
            raise ZImageError(f"corrupt zImage tag table at {table:#x}: no KLSZ tag")
        words, payload = found
        if not 2 <= words <= 6 or len(payload) < 2:
            raise ZImageError(f"corrupt zImage tag table at {table:#x}: KLSZ tag of {words} words")
        if not 0x30 <= payload[0] <= len(buf) - 4:
            raise ZImageError(
                f"corrupt zImage tag table at {table:#x}: KLSZ size_ptr {payload[0]:#x} "
                f"is outside the {len(buf):#x}-byte file"
            )
        fields["tag_words"] = words
        fields["size_ptr"], fields["kernel_bss"] = payload[0], payload[1]
        fields["inflated_size"] = _u32(buf, payload[0])  # unaligned on purpose: get_unaligned
        if not 0 < fields["inflated_size"] < _MAX_INFLATED:
            raise ZImageError(
                f"corrupt zImage tag table at {table:#x}: inflated size "
                f"{fields['inflated_size']:#x} read from {payload[0]:#x} is impossible"
            )
        if words >= 5 and len(payload) >= 3:
            fields["text_offset"] = payload[2]
        if words >= 6 and len(payload) >= 4:
            fields["malloc_size"] = payload[3]
    else:
        notes.append("no tag table (magic2 0x45454545 absent): kernel older than v4.15")
    if z + 8 <= len(buf) and _u32(buf, z, big=True) == FDT_MAGIC:
        fields["appended_dtb_size"] = _u32(buf, z + 4, big=True)
    lc0 = _scan_lc0(buf, start, z, big)
    if lc0 is None:
        notes.append("decompressor LC0 literal not found: restart, bss and stack end unknown")
    else:
        _, fields["bss_end"], fields["stack_end"], fields["restart"] = lc0
        fields["bss_start"] = z
        if fields["restart"] is None:
            notes.append("no .Lheadroom literal near LC0: restart unknown")
        if fields["stack_end"] is None:
            notes.append("no stack-end literal near LC0: stack end unknown")
    if thumb2:
        notes.append("Thumb-2 build: relocation pad P unknown (only the ARM encoding is decoded)")
    else:
        fields["reloc_pad"] = _scan_reloc_pad(buf[:z])
        if fields["reloc_pad"] is None:
            notes.append("no 'add sl, sl, #P; bic sl, sl, #255' pair: relocation pad P unknown")
        fields["wont_overwrite"] = _scan_wont_overwrite(buf[: min(z, 0x10000)])
        if fields["wont_overwrite"] is None:
            notes.append("no 'adr r9, wont_overwrite' found: wont_overwrite unknown")
    return ZImage(
        file_size=len(raw),
        container=container,
        data_size=len(buf),
        magic_start=start,
        magic_end=end,
        endian=endian,
        efi_stub=efi,
        thumb2=thumb2,
        notes=tuple(notes),
        **fields,
    )


# scripts/build-kernel leaves arch/arm/boot/compressed/vmlinux under this name next to its zImage.
BUILT_DECOMPRESSOR_ELF = "decompressor.elf"


def read_zimage(
    source: str | Path | bytes, decompressor_elf: str | Path | None = None, vmlinux: str | Path | None = None
) -> ZImage:
    """Read a zImage from a path or bytes; ELF files, when given (or a built zImage's own decompressor ELF
    beside it), override scanned values exactly."""
    if isinstance(source, bytes | bytearray | memoryview):
        raw = bytes(source)
    else:
        try:
            raw = Path(source).read_bytes()
        except OSError as exc:
            raise ZImageError(f"cannot read zImage {source}: {exc.strerror}") from None
    zi = parse_zimage(raw)
    if decompressor_elf is None and not isinstance(source, bytes | bytearray | memoryview):
        beside = Path(source).parent / BUILT_DECOMPRESSOR_ELF
        decompressor_elf = beside if beside.is_file() else None
    if decompressor_elf is not None or vmlinux is not None:
        from .zimage_elf import decompressor_symbols, vmlinux_symbols

        if decompressor_elf is not None:
            zi = replace(
                zi,
                **cast(dict[str, Any], decompressor_symbols(decompressor_elf, zi.magic_start)),
                notes=(*zi.notes, f"decompressor constants from {decompressor_elf}"),
            )
        if vmlinux is not None:
            zi = replace(
                zi, **cast(dict[str, Any], vmlinux_symbols(vmlinux)), notes=(*zi.notes, f"kernel sizes from {vmlinux}")
            )
    return zi
