"""Exact decompressor and kernel constants from ELF symbol tables (pyelftools).

`arch/arm/boot/compressed/vmlinux` gives restart, wont_overwrite, reloc_code_end, _edata, __bss_start, _end
and the stack end; `.L_user_stack_end` is a local label the assembler drops, so its equivalent is the end of the
`.stack` section (head.S puts the 4 KiB stack there, vmlinux.lds.S places it right after the bss).
The kernel `vmlinux` gives TEXT_OFFSET (`_text` - PAGE_OFFSET), the inflated size and the bss size.
"""

from __future__ import annotations

from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from ..errors import UserError


class ElfSymbolError(UserError):
    """An ELF file given on the command line lacks what we need."""


def _symbols(path: str | Path) -> tuple[dict[str, int], dict[str, tuple[int, int]]]:
    try:
        with open(path, "rb") as fh:
            elf = ELFFile(fh)
            syms: dict[str, int] = {}
            sections: dict[str, tuple[int, int]] = {}
            for sec in elf.iter_sections():
                sections[sec.name] = (sec["sh_addr"], sec["sh_size"])
                if isinstance(sec, SymbolTableSection):
                    for sym in sec.iter_symbols():
                        if sym.name and sym.name not in syms:
                            syms[sym.name] = sym["st_value"]
    except OSError as exc:
        raise ElfSymbolError(f"cannot read ELF {path}: {exc.strerror}") from None
    except ELFError as exc:
        raise ElfSymbolError(f"{path} is not a readable ELF file: {exc}") from None
    return syms, sections


def _need(syms: dict[str, int], path: str | Path, *names: str) -> int:
    for name in names:
        if name in syms:
            return syms[name]
    raise ElfSymbolError(f"{path}: symbol {' or '.join(names)} not found (stripped ELF?)")


def decompressor_symbols(path: str | Path, link_start: int = 0) -> dict[str, int]:
    """Fields for ZImage from the decompressor ELF, as offsets from its link address `_start`."""
    syms, sections = _symbols(path)
    start = syms.get("_start", link_start)
    restart = _need(syms, path, "restart") - start
    reloc_end = _need(syms, path, "reloc_code_end") - start
    bss_start = _need(syms, path, "__bss_start", "_edata") - start
    bss_end = _need(syms, path, "_end") - start
    if ".L_user_stack_end" in syms:
        stack_end = syms[".L_user_stack_end"] - start
    elif ".stack" in sections:
        addr, size = sections[".stack"]
        stack_end = addr + size - start
    else:
        stack_end = ((bss_end + 7) & ~7) + 4096  # head.S: .stack is 4096 bytes at ALIGN(8) after _end
    return {
        "restart": restart,
        "wont_overwrite": _need(syms, path, "wont_overwrite") - start,
        "reloc_pad": (reloc_end - restart + 256) & ~255,
        "bss_start": bss_start,
        "bss_end": bss_end,
        "stack_end": stack_end,
    }


def vmlinux_symbols(path: str | Path) -> dict[str, int]:
    """TEXT_OFFSET, inflated size and bss from the kernel ELF.

    PAGE_OFFSET is 16 MiB aligned for every VMSPLIT choice and TEXT_OFFSET is below 16 MiB, so
    `_text & 0xffffff` is TEXT_OFFSET.
    """
    syms, _ = _symbols(path)
    text = _need(syms, path, "_text", "stext")
    edata = _need(syms, path, "_edata")
    bss_start = _need(syms, path, "__bss_start")
    bss_stop = _need(syms, path, "__bss_stop", "_end")
    return {
        "text_offset": text & 0xFFFFFF,
        "inflated_size": edata - text,
        "kernel_bss": bss_stop - bss_start,
    }
