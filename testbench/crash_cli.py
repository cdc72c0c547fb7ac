"""`testbench analyze` on a `kexec --debug -p` log (oracle_cli hands a crash log here): the crash region,
kexec's crash placement, where the crash kernel's decompressor puts the kernel, what it overwrites inside
the reservation and what it writes outside it (lost to /proc/vmcore). Exit 0 safe, 1 collision or writes
outside, 3 unknown (the kernel version decides the decompressor's address)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from .errors import UserError
from .inputs.crashlog import parse_crash_log
from .inputs.kexeclog import KexecLog, KexecLogError, Placed, parse_kexec_log
from .inputs.zimage import ZImage
from .oracle.crash import ELFCOREHDR_ALIGN, CrashPlacement, CrashPrediction, CrashRegion, crash_place, judge_crash
from .oracle.crash_memory import CMA_ALIGN, BootMemory, CrashMemoryInputs, MemoryCheck, smallest_mem
from .oracle.placement import DEFAULT_VERSION, PAGE, align_up, version_family

EXIT = {"safe": 0, "collision": 1, "outside": 1, "unknown": 3}
CRASH_LOG_MARK = "crashkernel: ["
# Both ends of the decompressor address rule, for a log whose kernel version is not known
RULE_VERSIONS = (("6.1", "Linux >= 5.16"), ("5.15", "Linux < 5.16"))


def is_crash_log(text: str) -> bool:
    return CRASH_LOG_MARK in text


@dataclass(frozen=True)
class CrashAnalysis:
    verdict: str
    by_rule: tuple[tuple[str, CrashPrediction], ...]  # (which kernel versions, the judgement)

    def to_dict(self) -> dict:
        return {"verdict": self.verdict, "judged": [{"kernel": k, **p.to_dict()} for k, p in self.by_rule]}


def analyze_crash(
    text: str, zimage: ZImage | None, kernel_version: str | None, kexec_version: str | None
) -> CrashAnalysis:
    crash = parse_crash_log(text)
    if crash.crashkernel is None:
        raise UserError("the kexec -p log has no 'crashkernel: [...]' line: cannot tell the crash region")
    if zimage is None:
        raise UserError("a kexec -p log needs --zimage: the crash kernel's TEXT_OFFSET and decompressor decide it")
    try:
        log = parse_kexec_log(text)
    except KexecLogError as err:
        raise UserError(f"no kexec load plan in the log: {err}") from None
    region = CrashRegion(*crash.crashkernel)
    # System RAM is what the core header covers plus the reservation (kexec's own two lists)
    ram = tuple(sorted((*crash.coredump_ranges, *crash.reserved_ranges))) or ((region.start, region.end),)
    # kexec-tools >= 2.0.23 gives the crash DTB linux,usable-memory-range: the version matters, Debian 12's
    # is assumed when neither the user nor the log says
    version = kexec_version or log.kexec_version or DEFAULT_VERSION
    kernels = ((kernel_version, kernel_version),) if kernel_version else RULE_VERSIONS
    judged = tuple(
        (
            label,
            judge_crash(log, region, zimage, ram, kernel_version=v, kexec_version=version, elfcorehdr=crash.elfcorehdr),
        )
        for v, label in kernels
    )
    verdicts = {p.verdict for _, p in judged}
    return CrashAnalysis(verdicts.pop() if len(verdicts) == 1 else "unknown", judged)


def print_crash(analysis: CrashAnalysis, as_json: bool) -> int:
    if as_json:
        print(json.dumps(analysis.to_dict(), indent=2))
        return EXIT.get(analysis.verdict, 2)
    print(f"kexec -p: {analysis.verdict}")
    for label, p in analysis.by_rule:
        r = p.region
        print(f"  crash kernel {label}: region {r.label()}, decompressor puts the kernel at {p.kernel_address:#x}")
        print(f"    ({p.address_rule}); verdict {p.verdict}")
        for finding in p.findings() or ("nothing overwritten inside the reservation, nothing written outside it",):
            print(f"    - {finding}")
    return EXIT.get(analysis.verdict, 2)


ALIGNED_BASE = 0x8000000  # crashkernel=SIZE without @: the kernel reserves on a 128 MiB boundary (CRASH_ALIGN)


@dataclass(frozen=True)
class CrashRuntime:
    """What advise knows of the crash kernel's own memory (oracle/crash_memory.py), each with its source."""

    files: int  # the initramfs's regular files, page-rounded
    cma: int  # the build's CMA area
    boot: BootMemory | None  # the build's boot allocations on this board, when measured
    notes: tuple[str, ...]  # where files and cma came from
    cma_align: int = CMA_ALIGN


@dataclass(frozen=True)
class CrashAdvice:
    region_start: int
    image_size: int | None  # kexec -p --image-size; None: the default placement is already clear
    size: int  # the smallest crashkernel= size, in whole MiB: layout, and the memory rules when given
    placement: CrashPlacement  # with that size and image size
    judged: CrashPrediction
    lines: tuple[str, ...]
    layout_size: int = 0  # what the layout alone needs
    memory: MemoryCheck | None = None  # the crash kernel's memory at `size` (None: not modelled)
    runtime: CrashRuntime | None = None


def _log_of(placed: CrashPlacement, zimage: ZImage) -> KexecLog:
    """The load plan kexec -p would print for this placement (what judge_crash reads)."""
    pl = placed.placement
    return KexecLog(
        memory_ranges=(),
        zimage_size=zimage.size,
        file_size=zimage.data_size,
        zimage_requires=None,
        tag_offset=None,
        tag_size=None,
        text_data=zimage.inflated_size,
        bss=zimage.kernel_bss,
        total=None,
        kernel_space=None,
        kernel=Placed(pl.kernel_base, pl.image_size),
        initrd=Placed(*pl.initrd) if pl.initrd else None,
        dtb=Placed(*pl.dtb) if pl.dtb else None,
        entry=pl.kernel_base,
        segments=(),
        decompressor_copy=None,
    )


def crash_advise(
    zimage: ZImage,
    ram: tuple[int, int],
    start: int,
    kexec_version: str,
    kernel_version: str,
    initrd_size: int | None,
    dtb_size: int | None,
    runtime: CrashRuntime | None = None,
) -> CrashAdvice:
    """The smallest reservation at `start` whose layout is clear: the crash decompressor's footprint does
    not depend on the image size, so the initrd goes at its end (--image-size) and the region must reach
    past the DTB, plus the top MiB for the ELF core header. With `runtime`, grown until the crash kernel's
    mem= also meets the memory rules of oracle/crash_memory.py (tmpfs, and the boot's allocations when
    measured for the build)."""
    family = version_family(kexec_version)
    if zimage.inflated_size is None:
        raise UserError("the zImage has no KLSZ tag: kexec cannot size the kernel, so neither can the advice")
    probe = CrashRegion(start, min(ram[1], start + (1 << 30)))

    def judged(image_size: int | None) -> tuple[CrashPlacement, CrashPrediction]:
        placed = crash_place(probe, zimage, family, image_size=image_size, initrd_size=initrd_size, dtb_size=dtb_size)
        log = _log_of(placed, zimage)
        return placed, judge_crash(
            log, probe, zimage, (ram,), kernel_version=kernel_version, kexec_version=kexec_version
        )

    placed, p = judged(None)
    written = [r.end for r in p.prediction.regions if r.role == "written" and r.end > start]
    footprint_end = max(written)
    kernel_base = placed.placement.kernel_base
    image_size = None
    first = (
        placed.placement.initrd[0]
        if placed.placement.initrd
        else placed.placement.dtb[0]
        if placed.placement.dtb
        else None
    )
    if first is not None and first < footprint_end:
        image_size = align_up(footprint_end - kernel_base, PAGE)
        placed, p = judged(image_size)
    pl = placed.placement
    ends = [pl.kernel_base + pl.kernel_memsz, footprint_end]
    ends += [s[0] + s[1] for s in (pl.initrd, pl.dtb) if s is not None]
    size = align_up(max(ends) - start, ELFCOREHDR_ALIGN) + ELFCOREHDR_ALIGN
    layout_size = size
    region = CrashRegion(start, start + size)
    placed = crash_place(region, zimage, family, image_size=image_size, initrd_size=initrd_size, dtb_size=dtb_size)
    memory = None
    if runtime is not None:
        memory, size = _memory_size(runtime, placed, p.kernel_address, zimage, ram)
        region = CrashRegion(start, start + size)
        placed = crash_place(region, zimage, family, image_size=image_size, initrd_size=initrd_size, dtb_size=dtb_size)
    final = judge_crash(
        _log_of(placed, zimage), region, zimage, (ram,), kernel_version=kernel_version, kexec_version=kexec_version,
        elfcorehdr=placed.elfcorehdr,
    )  # fmt: skip
    lines = [
        f"crash kernel decompressed at {final.kernel_address:#x} ({final.address_rule})",
        f"its footprint ends at {footprint_end:#x}; default initrd at {first:#x}" if first is not None else "",
        f"layout ends at {max(ends):#x}; + the ELF core header's MiB at the top: {layout_size >> 20} MiB",
        *(_memory_lines(runtime, memory, size) if runtime is not None else ()),
        *(f"- {f}" for f in final.findings()),
    ]
    return CrashAdvice(
        start, image_size, size, placed, final, tuple(x for x in lines if x), layout_size, memory, runtime
    )


def memory_inputs(
    runtime: CrashRuntime, placed: CrashPlacement, kernel_address: int, zimage: ZImage
) -> CrashMemoryInputs:
    """The memory model's view of a crash placement (the positions do not depend on the region's size)."""
    pl = placed.placement
    assert zimage.inflated_size is not None
    return CrashMemoryInputs(
        start=placed.region.start,
        kernel=(kernel_address, zimage.inflated_size + (zimage.kernel_bss or 0)),
        initrd=pl.initrd,
        dtb=pl.dtb,
        files=runtime.files,
        cma=runtime.cma,
        cma_align=runtime.cma_align,
        own=runtime.boot.reserved_kib << 10 if runtime.boot else None,
    )


def _memory_size(
    runtime: CrashRuntime, placed: CrashPlacement, kernel_address: int, zimage: ZImage, ram: tuple[int, int]
) -> tuple[MemoryCheck | None, int]:
    """The crash kernel's memory at the layout's size, grown MiB by MiB until it meets the rules."""
    inputs = memory_inputs(runtime, placed, kernel_address, zimage)
    boot = runtime.boot.boot_kib << 10 if runtime.boot else None
    limit = ram[1] - placed.region.start - ELFCOREHDR_ALIGN
    check = smallest_mem(inputs, placed.mem_kib << 10, boot, limit)
    if check is None:
        return None, placed.region.size
    # mem = elfcorehdr - start, and the header takes the top MiB of a whole-MiB reservation
    return check, max(placed.region.size, check.mem + ELFCOREHDR_ALIGN)


def _memory_lines(runtime: CrashRuntime, memory: MemoryCheck | None, size: int) -> list[str]:
    lines = [f"crash kernel memory: {n}" for n in runtime.notes]
    if memory is None:
        return [*lines, "- no reservation in RAM leaves the crash kernel enough memory to unpack its initramfs"]
    boot = runtime.boot
    lines.append(f"at {size >> 20} MiB: {memory.reason_text(runtime.files, boot.boot_kib << 10 if boot else None)}")
    if boot is not None:
        lines.append(
            f"boot allocations {boot.boot_kib}K, own reservations {boot.reserved_kib}K: measured on {boot.machine} "
            f"({boot.source}; mem={boot.passed_mem_kib}K reached init"
            + (f", mem={boot.failed_mem_kib}K did not)" if boot.failed_mem_kib else ")")
        )
    else:
        lines.append(
            "boot allocations of this build not measured: the size covers the layout and tmpfs only "
            "(measure them: testbench advise --crash --measure)"
        )
    return lines


def print_crash_advice(a: CrashAdvice, as_json: bool, fixed_base: bool = True) -> int:
    if as_json:
        out = {
            "region_start": a.region_start,
            "crashkernel_size": a.size,
            "image_size": a.image_size,
            "elfcorehdr": a.placement.elfcorehdr[0],
            "mem_kib": a.placement.mem_kib,
            "layout_size": a.layout_size,
            "memory": None
            if a.memory is None
            else {
                "available": a.memory.available,
                "cma_at": a.memory.cma_at,
                "tmpfs_ok": a.memory.tmpfs_ok,
                "memory_ok": a.memory.memory_ok,
            },
            "boot_memory": a.runtime.boot.to_dict() if a.runtime and a.runtime.boot else None,
            "oracle": a.judged.to_dict(),
            "arithmetic": list(a.lines),
        }
        print(json.dumps(out, indent=2))
        return 0 if a.judged.verdict == "safe" else 1
    for line in a.lines:
        print(line)
    print()
    if a.judged.outside or a.judged.fatal:
        print(f"advice: no crashkernel= size at {a.region_start:#x} keeps this crash kernel whole (see above)")
        return 1
    if a.runtime is not None and a.memory is None:
        print(f"advice: no crashkernel= size at {a.region_start:#x} within RAM leaves the crash kernel enough memory")
        return 1
    args = f" and kexec -p --image-size={a.image_size:#x}" if a.image_size else ""
    where = f"@{a.region_start:#x}" if fixed_base else " (the kernel puts it on a 128 MiB boundary)"
    print(f"advice: crashkernel={a.size >> 20}M{where}{args}")
    if a.memory is None or a.runtime is None or a.runtime.boot is None:
        print(f"  (the crash kernel then runs in mem={a.placement.mem_kib}K; its boot allocations are not measured)")
    elif a.size > a.layout_size:
        print(f"  (the layout needs {a.layout_size >> 20} MiB; the crash kernel's memory {a.size >> 20} MiB)")
    return 0
