"""Regions, overlaps and how bad they are.

Roles:
  "written"  memory the decompressor or the early kernel writes: kernel, kernel.bss, pagetables,
             decompressor.copy/.bss/.stack/.malloc
  "payload"  what kexec loaded and the new kernel still needs afterwards: initrd, dtb
  "loaded"   the zImage as kexec loaded it (overwritten by design once relocated)
  "ram"      System RAM ranges, for the picture

A collision is a written region overlapping a payload, or a written region outside RAM.

Severity: "benign" only when the overlap lies in the decompressor's malloc arena at or above
MALLOC_USED_BOUND bytes from its bottom. The arena is a bump allocator growing up from the stack top
(include/linux/decompress/mm.h), and the ARM decompressor hands every lib/decompress_* routine both its
input and output buffer, so the heap only holds decoder state: about 9.5 KiB for gzip (z_stream +
inflate_state), about 16 KiB for LZMA (lc=3, lp=0 probabilities), about 29 KiB for XZ single-call mode
(xz_dec + xz_dec_lzma2 with 16 literal coders of 0x300 16-bit probabilities, + BCJ), nothing for LZO
and LZ4. 32 KiB covers the largest with room, so bytes above arena + 0x8000 are never written.
Everything else is "fatal".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from .placement import subtract_ranges

MALLOC_USED_BOUND = 0x8000
MALLOC_REGION = "decompressor.malloc"


@dataclass(frozen=True, slots=True)
class Region:
    name: str
    start: int
    end: int  # exclusive
    role: str  # "written", "payload", "loaded" or "ram"

    @property
    def size(self) -> int:
        return self.end - self.start

    def to_dict(self) -> dict:
        return {"name": self.name, "start": self.start, "end": self.end, "size": self.size, "role": self.role}


class Collision(NamedTuple):
    """Immutable like the dataclasses, but a NamedTuple: it is built in the benchmark's hot loop."""

    a: str  # the written region
    b: str  # the payload, or "outside RAM"
    start: int
    end: int
    severity: str  # "fatal" or "benign"

    @property
    def label(self) -> str:
        return f"{self.a} x {self.b} [{self.start:#x}, {self.end:#x})"

    def to_dict(self) -> dict:
        return {"a": self.a, "b": self.b, "start": self.start, "end": self.end, "severity": self.severity}


def _severity(name: str, lo: int, malloc_start: int | None) -> str:
    if name == MALLOC_REGION and malloc_start is not None and lo >= malloc_start + MALLOC_USED_BOUND:
        return "benign"
    return "fatal"


def find_collisions(
    written: Sequence[tuple[str, int, int]],
    payloads: Sequence[tuple[str, int, int]],
    ram: Sequence[tuple[int, int]] | None,
) -> list[Collision]:
    """Every overlap of a written region with a payload, plus written bytes outside RAM (if RAM is known)."""
    malloc_start = next((s for n, s, _ in written if n == MALLOC_REGION), None)
    out: list[Collision] = []
    for name, ws, we in written:
        if we <= ws:
            continue
        for pname, ps, pe in payloads:
            lo = ws if ws > ps else ps
            hi = we if we < pe else pe
            if lo < hi:
                out.append(Collision(name, pname, lo, hi, _severity(name, lo, malloc_start)))
        if ram:
            inside = False
            for rs, re_ in ram:  # the common case, checked without building lists
                if rs <= ws and we <= re_:
                    inside = True
                    break
            if inside:
                continue
            for lo, hi in subtract_ranges([(ws, we)], ram):
                out.append(Collision(name, "outside RAM", lo, hi, _severity(name, lo, malloc_start)))
    return out


def worst(collisions: Sequence[Collision]) -> str:
    """'fatal', 'benign' or 'none'."""
    if any(c.severity == "fatal" for c in collisions):
        return "fatal"
    return "benign" if collisions else "none"
