"""From known and unknown inputs to a verdict.

Inputs that may be missing get a candidate list (first = the value shown in the layout):
  TEXT_OFFSET   0x8000 (kexec-tools' own assumption), 0x108000, 0x208000, 0x308000 (arch/arm/Makefile)
  restart & ~31 0xC0 without an EFI stub, 0x10A0 with one (DOMAIN 7.1); both when we cannot tell
  P             0xC00 (worst), 0x800
  decompressor bss  0 (shown), 0x1000 (the largest seen)
  kernel_address fallback  only when kexec's load address is outside /memory's 128 MiB-aligned blocks:
                Linux >= 5.12 moves the kernel to the lowest memory base (rounded up to 2 MiB), older
                kernels keep the address outside RAM; tried both when the kernel version is not known
Every combination is evaluated. The verdict is "safe" if no combination has a fatal collision,
"collision" if all have one, and otherwise "unknown", naming each input whose value alone flips it.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

from .collide import Collision, Region, find_collisions, worst
from .footprint import WONT_OVERWRITE_GAP, Decomp, footprint, kernel_address
from .placement import Placement

TEXT_OFFSETS = (0x8000, 0x108000, 0x208000, 0x308000)
R_NO_EFI, R_EFI = 0xC0, 0x10A0
P_RANGE = (0xC00, 0x800)
BSS_RANGE = (0, 0x1000)
MALLOC_SIZE = 0x10000
FALLBACK_DIM = "kernel_address fallback (Linux >= 5.12)"
BOGUS_DTB = "appended-DTB magic copied by kexec 2.0.17-2.0.21"


@dataclass(frozen=True)
class Knowns:
    """Everything the oracle may know about one load; None = not known."""

    ram: tuple[tuple[int, int], ...] | None
    load: int  # L: where kexec put the zImage (kernel_base)
    z: int
    inflated: int | None = None
    kernel_bss: int | None = None
    text_offset: int | None = None
    restart: int | None = None
    reloc_pad: int | None = None
    bss_start: int | None = None
    bss_end: int | None = None
    stack_end: int | None = None
    malloc_size: int | None = None
    wont_overwrite: int | None = None
    efi_stub: bool | None = None
    dtb8: int = 0
    copy: tuple[int, int, int] | None = None  # (src_start, dst_start, dst_end) from a C: line
    initrd: tuple[int, int] | None = None
    dtb: tuple[int, int] | None = None
    zimage_len: int | None = None  # what kexec loaded at L (for the picture)
    memory: tuple[tuple[int, int], ...] | None = None  # the DTB's /memory; None: taken as `ram`
    fallback: bool | None = None  # the kernel has the kernel_address fallback (>= 5.12); None: unknown
    # kexec-tools 2.0.17-2.0.21 copied the appended DTB's magic and nothing else (DOMAIN 2.5, 9.2): head.S
    # takes the appended-DTB path with a DTB of size 0 and hands the kernel that instead of kexec's
    bogus_appended_dtb: bool = False
    assumptions: tuple[str, ...] = ()


@dataclass(frozen=True)
class Prediction:
    verdict: str  # "safe", "collision" or "unknown"
    regions: tuple[Region, ...]
    collisions: tuple[Collision, ...]
    assumptions: tuple[str, ...]
    undecided: tuple[str, ...] = ()  # the missing inputs that would decide an "unknown"
    placement: Placement | None = None
    scenarios: int = 1
    details: dict = field(default_factory=dict)

    @property
    def fatal(self) -> bool:
        return any(c.severity == "fatal" for c in self.collisions)

    def to_dict(self) -> dict:
        return {
            "verdict": self.verdict,
            "collisions": [c.to_dict() for c in self.collisions],
            "layout": [r.to_dict() for r in sorted(self.regions, key=lambda r: (r.start, r.end))],
            "assumptions": list(self.assumptions),
            "undecided": list(self.undecided),
            "scenarios": self.scenarios,
            **self.details,
        }


def _hexs(values: Sequence[int]) -> str:
    return ", ".join(f"{v:#x}" for v in values)


def _yes_no(values: Sequence[int]) -> str:
    return ", ".join("yes" if v else "no" for v in values)


def _dimensions(k: Knowns) -> tuple[dict[str, tuple[int, ...]], list[str]]:
    """Candidate values for each decompressor/kernel constant, and what we assumed."""
    notes: list[str] = []
    dims: dict[str, tuple[int, ...]] = {}
    if k.text_offset is not None:
        dims["TEXT_OFFSET"] = (k.text_offset,)
    else:
        dims["TEXT_OFFSET"] = TEXT_OFFSETS
        notes.append(
            f"TEXT_OFFSET unknown (no TEXT_OFFSET tag word, no --text-offset): shown as 0x8000, "
            f"also tried {_hexs(TEXT_OFFSETS[1:])}"
        )
    if k.copy is not None:
        dims["restart"] = ((k.copy[0] - k.load) & ~31,)
        dims["P"] = (0,)  # unused: the C: line gives the destination
    else:
        if k.restart is not None:
            dims["restart"] = (k.restart,)
        elif k.efi_stub is None:
            dims["restart"] = (R_NO_EFI, R_EFI)
            notes.append("restart unknown: restart & ~31 taken as 0xC0 (no EFI stub) and 0x10A0 (EFI stub)")
        else:
            dims["restart"] = (R_EFI if k.efi_stub else R_NO_EFI,)
            notes.append(
                f"restart not found in the binary: restart & ~31 taken as {dims['restart'][0]:#x} "
                f"({'EFI stub' if k.efi_stub else 'no EFI stub'} build)"
            )
        if k.reloc_pad is not None:
            dims["P"] = (k.reloc_pad,)
        else:
            dims["P"] = P_RANGE
            notes.append("relocation pad P unknown: tried 0xC00 and 0x800")
    if k.bss_end is not None and k.stack_end is not None:
        dims["decompressor bss"] = (k.bss_end - (k.bss_start if k.bss_start is not None else k.z),)
    else:
        dims["decompressor bss"] = BSS_RANGE
        notes.append(
            "decompressor bss unknown: shown as 0 (ranges above the copy move up by ALIGN8(bss)), also tried 0x1000"
        )
    if k.malloc_size is None:
        notes.append("MALLOC_SIZE taken as 0x10000 (its value in every kernel so far)")
    if k.wont_overwrite is None and k.dtb8:
        notes.append(f"wont_overwrite taken as restart + {WONT_OVERWRITE_GAP:#x} (as in Debian's 6.1 and 6.12)")
    memory = _memory(k)
    if memory and not any(s <= (k.load & 0xF8000000) < e for s, e in memory):
        if k.fallback is None:
            dims[FALLBACK_DIM] = (1, 0)
            notes.append(
                f"the load address {k.load:#x} is outside /memory's 128 MiB-aligned blocks: the kernel address "
                "depends on the kernel version (>= 5.12: lowest memory base rounded up to 2 MiB); both tried"
            )
        else:
            dims[FALLBACK_DIM] = (int(k.fallback),)
    return dims, notes


def _memory(k: Knowns) -> tuple[tuple[int, int], ...] | None:
    return k.memory if k.memory is not None else k.ram


def _decomp(k: Knowns, restart: int, pad: int, bss: int) -> Decomp:
    bss_start = k.bss_start if k.bss_start is not None else k.z
    bss_end = bss_start + bss
    stack_end = k.stack_end
    if stack_end is None or k.bss_end is None:
        stack_end = ((bss_end + 7) & ~7) + 4096  # head.S: 4 KiB .stack at ALIGN(8) after _end
    return Decomp(
        k.z,
        restart,
        pad,
        bss_start,
        bss_end,
        stack_end,
        k.malloc_size or MALLOC_SIZE,
        k.dtb8,
        k.wont_overwrite,
        appended=bool(k.dtb8) or k.bogus_appended_dtb,
    )


def _payloads(k: Knowns) -> list[tuple[str, int, int]]:
    out = []
    if k.initrd:
        out.append(("initrd", k.initrd[0], k.initrd[0] + k.initrd[1]))
    if k.dtb:
        out.append(("dtb", k.dtb[0], k.dtb[0] + k.dtb[1]))
    return out


def scenario(k: Knowns, to: int, restart: int, pad: int, bss: int, fallback: int = 1) -> tuple[list, list[Collision]]:
    """One concrete combination: written regions and collisions."""
    kaddr = kernel_address(k.load, to, _memory(k), bool(fallback))
    d = _decomp(k, restart, pad, bss)
    written = footprint(k.load, kaddr, k.inflated or 0, k.kernel_bss or 0, d, k.copy)
    collisions = find_collisions(written, _payloads(k), k.ram)
    if k.bogus_appended_dtb and k.dtb:
        # Not an overlap: the 4 bytes kexec copied past _edata make the kernel boot with a DTB of size 0
        # instead of the one at k.dtb.
        collisions.append(Collision(BOGUS_DTB, "dtb", k.load + k.z, k.load + k.z + 4, "fatal"))
    return written, collisions


def _static_regions(k: Knowns) -> list[Region]:
    regs = [Region(n, s, e, "payload") for n, s, e in _payloads(k)]
    regs += [Region("ram", s, e, "ram") for s, e in (k.ram or ())]
    if k.zimage_len:
        regs.append(Region("zimage", k.load, k.load + k.zimage_len, "loaded"))
    return regs


def evaluate(k: Knowns, placement: Placement | None = None) -> Prediction:
    """Verdict over every combination of the unknown inputs."""
    if k.inflated is None or k.kernel_bss is None:
        return Prediction(
            "unknown",
            tuple(_static_regions(k)),
            (),
            k.assumptions,
            ("inflated kernel size and kernel bss (no KLSZ tag in the log; give --zimage)",),
            placement,
            0,
        )
    dims, notes = _dimensions(k)
    names = list(dims)
    outcome: dict[tuple[int, ...], str] = {}
    nominal = None
    for combo in itertools.product(*dims.values()):
        written, cols = scenario(k, *combo)
        outcome[combo] = worst(cols)
        if nominal is None:
            nominal = (written, cols)
    assert nominal is not None
    fatal = [o == "fatal" for o in outcome.values()]
    verdict = "collision" if all(fatal) else "safe" if not any(fatal) else "unknown"
    undecided: list[str] = []
    if verdict == "unknown":
        bad_combo = {c: o == "fatal" for c, o in outcome.items()}
        for i, name in enumerate(names):
            flips = any(bad_combo[c] != bad_combo[c[:i] + (v,) + c[i + 1 :]] for c in outcome for v in dims[name])
            if not flips:
                continue
            good = [v for v in dims[name] if not any(b for c, b in bad_combo.items() if c[i] == v)]
            bad = [v for v in dims[name] if all(b for c, b in bad_combo.items() if c[i] == v)]
            mixed = [v for v in dims[name] if v not in good and v not in bad]
            show = _yes_no if name == FALLBACK_DIM else _hexs
            text = f"{name}: safe for {show(good) or 'none'}; collision for {show(bad) or 'none'}"
            undecided.append(text + (f"; depends on the rest for {show(mixed)}" if mixed else ""))
    written, cols = nominal
    regions = _static_regions(k) + [Region(n, s, e, "written") for n, s, e in written if e > s]
    return Prediction(
        verdict, tuple(regions), tuple(cols), (*k.assumptions, *notes), tuple(undecided), placement, len(outcome)
    )
