"""The two entry points: predict (zImage + RAM + kexec version) and analyze (observed kexec log)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from ..errors import UserError
from ..inputs.kexeclog import KexecLog, Segment
from ..inputs.zimage import ZImage
from .footprint import has_fallback, kernel_address
from .placement import (
    FAMILIES,
    MAGIC_COPY,
    OPTION_CLASH,
    PAGE,
    ULONG_MAX,
    Placement,
    in_releases,
    option_clash_error,
    place,
    version_family,
)
from .predict import TEXT_OFFSETS, Knowns, Prediction, evaluate

P_PLAUSIBLE = (0x100, 0x2000)  # a relocation pad outside this is not what head.S computes


class AnalyzeError(UserError):
    """The log and files together do not describe a load we can evaluate."""


def _appended_dtb8(zi: ZImage | None, family: str, version: str | None) -> tuple[int, bool, list[str]]:
    """(D8 the decompressor uses, whether kexec's 4-byte magic copy gives it a bogus DTB, notes)."""
    if zi is None or not zi.appended_dtb_size:
        return 0, False, []
    if family == "<=2.0.12":
        # the whole file is loaded, DTB included, so the decompressor finds and uses it
        note = "appended DTB loaded with the zImage (kexec-tools <= 2.0.12)"
        return (zi.appended_dtb_size + 7) & ~7, False, [note]
    if in_releases(version, MAGIC_COPY):
        note = (
            f"kexec-tools {version} copies the 4 bytes after _edata (the appended DTB's magic; fixed in 2.0.22 by "
            "9817ec8): the decompressor takes a DTB of size 0 for the appended one and the kernel gets it "
            "instead of kexec's"
        )
        return 0, True, [note]
    note = "zImage has an appended DTB; kexec-tools >= 2.0.13 cuts it off"
    if family == ">=2.0.17" and version is None:
        note += " (if the loader is 2.0.17-2.0.21, it copies the DTB's 4-byte magic and the kernel gets a bogus DTB)"
    return 0, False, [note]


def _zimage_fields(zi: ZImage) -> dict:
    return {
        "restart": zi.restart,
        "reloc_pad": zi.reloc_pad,
        "bss_start": zi.bss_start,
        "bss_end": zi.bss_end,
        "stack_end": zi.stack_end,
        "malloc_size": zi.malloc_size,
        "efi_stub": zi.efi_stub,
        "text_offset": zi.text_offset,
        "wont_overwrite": zi.wont_overwrite,
    }


def tag_words(zi: ZImage) -> tuple[int, int] | None:
    """(TEXT_OFFSET, MALLOC_SIZE) when the KLSZ tag carries them (6 words, Linux >= 5.10)."""
    if zi.tag_words is not None and zi.tag_words >= 6 and zi.text_offset is not None and zi.malloc_size is not None:
        return zi.text_offset, zi.malloc_size
    return None


def place_zimage(
    zimage: ZImage,
    ram: Sequence[tuple[int, int]],
    family: str,
    image_size: int | None,
    initrd_size: int | None,
    dtb_size: int | None,
    *,
    file_size: int | None = None,
    mem_min: int = 0,
    mem_max: int = ULONG_MAX,
) -> Placement:
    """`place()` with everything it reads from the zImage itself (sizes, the tag's words, the EFI stub);
    `file_size` is what kexec read when it differs from the unwrapped zImage (a log's "file size")."""
    return place(
        ram,
        family,
        zimage.size,
        zimage.data_size if file_size is None else file_size,
        zimage.inflated_size,
        zimage.kernel_bss,
        image_size,
        initrd_size,
        dtb_size,
        mem_min,
        mem_max,
        tag_words(zimage),
        efi_stub=zimage.efi_stub,
    )


def _fallback(kernel_version: str | None) -> tuple[bool | None, list[str]]:
    fallback = has_fallback(kernel_version)
    if kernel_version and fallback is None:
        return None, [f"cannot read a Linux version from {kernel_version!r}: kernel_address fallback unknown"]
    return fallback, []


def predict(
    zimage: ZImage,
    ram_ranges: Sequence[tuple[int, int]],
    kexec_version: str,
    image_size: int | None = None,
    initrd_size: int | None = None,
    dtb_size: int | None = None,
    text_offset: int | None = None,
    *,
    kernel_version: str | None = None,
    mem_min: int = 0,
    mem_max: int = ULONG_MAX,
    command_line: bool = False,
) -> Prediction:
    """What kexec-tools `kexec_version` would do with this zImage, and whether the boot survives it.

    `command_line`: the load passes --command-line/--append (which 2.0.17-2.0.20 cannot take on ARM).
    """
    family = version_family(kexec_version)
    if command_line and in_releases(kexec_version, OPTION_CLASH):
        raise option_clash_error(kexec_version)
    ram = tuple(sorted((int(s), int(e)) for s, e in ram_ranges))
    if not ram:
        raise AnalyzeError("no RAM ranges given")
    pl = place_zimage(zimage, ram, family, image_size, initrd_size or None, dtb_size, mem_min=mem_min, mem_max=mem_max)
    dtb8, bogus, notes = _appended_dtb8(zimage, family, kexec_version)
    fallback, more = _fallback(kernel_version)
    notes += more
    fields = _zimage_fields(zimage)
    if text_offset is not None:
        fields["text_offset"] = text_offset
    k = Knowns(
        ram=ram,
        load=pl.kernel_base,
        z=zimage.size,
        inflated=zimage.inflated_size,
        kernel_bss=zimage.kernel_bss,
        dtb8=dtb8,
        initrd=pl.initrd,
        dtb=pl.dtb,
        zimage_len=pl.kernel_memsz,
        assumptions=tuple(notes),
        fallback=fallback,
        bogus_appended_dtb=bogus,
        **fields,
    )
    p = evaluate(k, pl)
    return replace(p, details={"kexec_family": family, "image_size": pl.image_size})


def _kernel_segment(log: KexecLog, load: int | None) -> Segment | None:
    return next((s for s in log.segments if s.mem is not None and s.mem == load), None)


def _payloads_from_segments(
    log: KexecLog, load: int
) -> tuple[tuple[int, int] | None, tuple[int, int] | None, list[str]]:
    """Without Initrd:/DT lines: the DTB is the highest other segment, the initrd the one below it."""
    others = sorted(
        (s for s in log.segments if s.mem is not None and s.mem != load and s.bufsz is not None),
        key=lambda s: s.mem or 0,
    )
    others = [s for s in others if s.mem != load - 0x8000 + 0x1000]  # ATAGs at base + 0x1000
    notes = []
    dtb = initrd = None
    if others:
        top = others[-1]
        dtb = (top.mem, top.bufsz)
        notes.append(f"segment at {top.mem:#x} taken as the DTB (no 'DT :' line)")
    if len(others) >= 2:
        nxt = others[-2]
        initrd = (nxt.mem, nxt.bufsz)
        notes.append(f"segment at {nxt.mem:#x} taken as the initrd (no 'Initrd:' line)")
    return initrd, dtb, notes  # type: ignore[return-value]


def _infer_text_offset(
    copy: tuple[int, int, int], load: int, inflated: int, ram: tuple[tuple[int, int], ...] | None
) -> int | None:
    """The C: line's destination is (K + I + P) & ~255; keep the one TEXT_OFFSET giving a sane P."""
    fits = []
    for to in TEXT_OFFSETS:
        pad = copy[1] - ((kernel_address(load, to, ram) + inflated) & ~255)
        if P_PLAUSIBLE[0] <= pad <= P_PLAUSIBLE[1]:
            fits.append(to)
    return fits[0] if len(fits) == 1 else None


def analyze(
    log: KexecLog,
    zimage: ZImage | None = None,
    text_offset: int | None = None,
    kexec_version: str | None = None,
    *,
    kernel_version: str | None = None,
    memory: Sequence[tuple[int, int]] | None = None,
    restart: int | None = None,
    efi_stub: bool | None = None,
    reloc_pad: int | None = None,
) -> Prediction:
    """Evaluate an observed load. Values in the log win; the zImage fills what the log lacks.

    `kernel_version` (of the kernel being loaded) decides the kernel_address fallback (Linux >= 5.12);
    `memory` is the DTB's /memory when known (the decompressor reads that, not /proc/iomem); `restart`,
    `efi_stub` and `reloc_pad` override what the zImage says (or stand in when there is none).
    """
    notes: list[str] = []
    ram = tuple(log.memory_ranges) or None
    if ram is None:
        notes.append("no MEMORY RANGES in the log: writes outside RAM are not checked")
    load = log.kernel.address if log.kernel else log.entry
    if load is None:
        raise AnalyzeError("the log shows neither a 'Kernel:' line nor an entry address: cannot place the zImage")
    family = (
        version_family(kexec_version)
        if kexec_version
        else (version_family(log.kexec_version) if log.kexec_version else log.format)
    )
    if family not in FAMILIES:
        family = ">=2.0.17"
    kseg = _kernel_segment(log, load)
    z = log.zimage_size
    if z is None and zimage is not None:
        z = zimage.size
    if z is None and kseg is not None and kseg.bufsz is not None:
        z = kseg.bufsz - (0 if family == "<=2.0.12" else 4)
        notes.append(f"zImage size taken from the kernel segment: {z:#x}")
    if z is None:
        raise AnalyzeError("the log has no zImage size and no kernel segment; give --zimage")
    inflated, kbss = log.text_data, log.bss
    if zimage is not None:
        if inflated is not None and zimage.inflated_size not in (None, inflated):
            notes.append(
                f"log text+data {inflated:#x} differs from the zImage's {zimage.inflated_size:#x}: "
                "is --zimage the file that was loaded? using the log"
            )
        if zimage.size != z:
            notes.append(f"log zImage size {z:#x} differs from the file's {zimage.size:#x}; using the log")
        inflated = inflated if inflated is not None else zimage.inflated_size
        kbss = kbss if kbss is not None else zimage.kernel_bss
    fields = _zimage_fields(zimage) if zimage is not None else {}
    if fields.get("text_offset") is None and log.tag_text_offset is not None:
        fields["text_offset"] = log.tag_text_offset  # the tag-aware loader printed the tag's word
        notes.append(f"TEXT_OFFSET {log.tag_text_offset:#x} from kexec's 'Kernel TEXT_OFFSET' line")
    if fields.get("malloc_size") is None and log.tag_malloc_size is not None:
        fields["malloc_size"] = log.tag_malloc_size
    for name, value in (("restart", restart), ("efi_stub", efi_stub), ("reloc_pad", reloc_pad)):
        if value is not None:
            fields[name] = value  # given on the command line: decides an "unknown" that hinged on it
    if text_offset is not None:
        fields["text_offset"] = text_offset
    copy = None
    if log.decompressor_copy is not None:
        c = log.decompressor_copy
        copy = (c.src_start, c.dst_start, c.dst_end)
        notes.append(f"relocation taken from the decompressor's C: line: {c.src_start:#x} -> {c.dst_start:#x}")
        if fields.get("text_offset") is None and inflated is not None:
            to = _infer_text_offset(copy, load, inflated, ram)
            if to is not None:
                fields["text_offset"] = to
                notes.append(
                    f"TEXT_OFFSET {to:#x} inferred from the C: line (the only value giving a "
                    "relocation pad in 0x100..0x2000)"
                )
    initrd = (log.initrd.address, log.initrd.size) if log.initrd else None
    dtb = (log.dtb.address, log.dtb.size) if log.dtb else None
    if log.initrd is None and log.dtb is None and log.segments:
        initrd, dtb, more = _payloads_from_segments(log, load)
        notes += more
    version = kexec_version or log.kexec_version
    dtb8, bogus, more = _appended_dtb8(zimage, family, version)
    notes += more
    fallback, more = _fallback(kernel_version)
    notes += more
    zlen = kseg.memsz if kseg is not None and kseg.memsz else ((z + 4 + PAGE - 1) & -PAGE)
    k = Knowns(
        ram=ram,
        load=load,
        z=z,
        inflated=inflated,
        kernel_bss=kbss,
        dtb8=dtb8,
        copy=copy,
        initrd=initrd,
        dtb=dtb,
        zimage_len=zlen,
        assumptions=tuple(notes),
        memory=tuple(sorted(memory)) if memory else None,
        fallback=fallback,
        bogus_appended_dtb=bogus,
        **fields,
    )
    p = evaluate(k, _placement_from_log(log, load, family))
    return replace(p, details={"kexec_family": family})


def _placement_from_log(log: KexecLog, load: int, family: str) -> Placement | None:
    if log.kernel is None:
        return None
    kseg = _kernel_segment(log, load)
    return Placement(
        family,
        load - 0x8000,
        load,
        kseg.memsz if kseg and kseg.memsz else 0,
        log.kernel.size,
        (log.initrd.address, log.initrd.size) if log.initrd else None,
        (log.dtb.address, log.dtb.size) if log.dtb else None,
    )
