"""The crash kernel's own memory: what `crashkernel=` must hold beyond the layout (`advise --crash`).
Pure functions, no I/O.

kexec -p gives the crash kernel mem=SIZE, the reservation up to the ELF core header. At boot, before it
frees anything, that memory holds (arch/arm/mm/init.c arm_memblock_init, kernel/dma/contiguous.c,
init/initramfs.c):
- its image, _text to _end (the zImage tag: inflated size + bss), and the 16 KiB first-level page table;
- the initrd archive and the DTB kexec loaded (memblock-reserved until the initramfs is unpacked);
- the page array, a 32-byte struct page per 4 KiB page;
- the CMA area (CONFIG_CMA_SIZE_MBYTES, 16 MiB in Debian's armmp) whenever a window of that size is free
  below mem's end, taken top down on a pageblock boundary: a small reservation has none ("cma: Failed to
  reserve 16 MiB"), a larger one sets 16 MiB aside for movable pages only.
What is left (the kernel's "Memory: NK/MK available") must meet three rules:
- tmpfs: rootfs is a tmpfs sized, when it is mounted, to half the RAM then available (the CMA area is
  released to the page allocator later, at core_initcall); the initramfs's files (page-rounded) must fit
  in that half, or the kernel says "Initramfs unpacking failed: write error";
- boot: the boot's own allocations (slab, percpu, hash tables, stacks, driver probing) are not movable and
  must fit in what is available outside the CMA area;
- memory: they and the files (tmpfs pages are movable: they may use the CMA area) must fit in both, or the
  OOM killer ends the boot ("System is deadlocked on memory").
The boot's allocations are a fact of one kernel build on one board, measured in QEMU (`testbench advise
--crash --measure`) to within the 1 MiB steps of mem=. Measured on virt with Debian's 6.1 armmp, a 1 MiB
payload: 35M fails, 36M passes, and 50M, where the CMA area first fits, passes with 10660K available.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .placement import PAGE, align_down, align_up, subtract_ranges

STRUCT_PAGE = 32  # sizeof(struct page) on 32-bit ARM without debug options
FIRST_LEVEL_TABLE = 0x4000  # swapper_pg_dir, just below the kernel's text (arm_mm_memblock_reserve)
CMA_ALIGN = 4 << 20  # CMA_MIN_ALIGNMENT_BYTES, PAGE_SIZE << (MAX_ORDER - 1), with the default MAX_ORDER 11
MIB = 1 << 20


@dataclass(frozen=True)
class BootMemory:
    """One kernel build's boot allocations on one board: measured, keyed by the zImage's sha256."""

    zimage_sha256: str
    machine: str
    boot_kib: int  # memory the boot allocates besides the initramfs's files, up to init
    reserved_kib: int  # the kernel's own boot reservations: image, page table, early allocations
    passed_mem_kib: int  # the measurement: the smallest mem= that reached init ...
    failed_mem_kib: int | None  # ... and the mem= 1 MiB below it, which did not
    source: str  # how and when it was measured

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class CrashMemoryInputs:
    """Where the crash kernel's boot-time reservations lie (from the crash placement) and what it unpacks."""

    start: int  # the crash kernel's RAM starts here (the reservation's start)
    kernel: tuple[int, int]  # (address, bytes): _text to _end where the decompressor put it
    initrd: tuple[int, int] | None  # (address, bytes)
    dtb: tuple[int, int] | None
    files: int  # bytes of the initramfs's regular files, each rounded up to a page
    cma: int  # the CMA area the build asks for (0: none)
    cma_align: int = CMA_ALIGN  # its alignment: a pageblock (8 MiB in armmp, CONFIG_ARCH_FORCE_MAX_ORDER=12)
    # What the kernel's own boot reservations take: measured (BootMemory.reserved_kib, the "Memory:" line
    # minus the rest) or, unmeasured, _text to _end plus the page table (~0.7 MiB more than measured).
    own: int | None = None


@dataclass(frozen=True)
class MemoryCheck:
    """One mem= judged: what is available, whether the CMA area fits, and both rules."""

    mem: int
    available: int
    cma_at: int | None
    tmpfs_ok: bool
    memory_ok: bool | None  # None: the build's boot allocations are not known

    @property
    def ok(self) -> bool:
        return self.tmpfs_ok and self.memory_ok is not False

    def reason_text(self, files: int, boot: int | None) -> str:
        kib = lambda n: f"{n >> 10}K"  # noqa: E731
        cma = f", the CMA area at {self.cma_at:#x}" if self.cma_at is not None else ", no room for the CMA area"
        head = f"mem={kib(self.mem)}: {kib(self.available)} available{cma}"
        if not self.tmpfs_ok:
            return f"{head}; the initramfs's files ({kib(files)}) exceed tmpfs's half ({kib(self.available // 2)})"
        if self.memory_ok is False and boot is not None:
            return f"{head}; short of boot {kib(boot)} + files {kib(files)}: out of memory"
        need = f"; holds boot {kib(boot)} + files {kib(files)}" if boot is not None else ""
        return f"{head}{need}; files within tmpfs's half ({kib(self.available // 2)})"


def cma_window(free: Sequence[tuple[int, int]], size: int, align: int = CMA_ALIGN) -> int | None:
    """Where memblock puts the CMA area: top down, the highest aligned base whose window is free."""
    if size <= 0:
        return None
    for lo, hi in sorted(free, reverse=True):
        base = align_down(hi - size, align)
        if base >= lo:
            return base
    return None


def _reservations(inputs: CrashMemoryInputs, mem: int) -> tuple[int, int, int | None]:
    """(the kernel's own reservations, everything else taken at boot, where the CMA area went)."""
    end = inputs.start + mem

    def clip(a: int, b: int) -> tuple[int, int]:
        return max(a, inputs.start), max(min(b, end), max(a, inputs.start))

    k_addr, k_size = inputs.kernel
    kernel = clip(align_down(k_addr - FIRST_LEVEL_TABLE, PAGE), align_up(k_addr + k_size, PAGE))
    loaded = [clip(align_down(a, PAGE), align_up(a + n, PAGE)) for a, n in filter(None, (inputs.initrd, inputs.dtb))]
    cma_at = cma_window(subtract_ranges([(inputs.start, end)], [kernel, *loaded]), inputs.cma, inputs.cma_align)
    own = inputs.own if inputs.own is not None else kernel[1] - kernel[0]
    others = sum(b - a for a, b in loaded) + (mem // PAGE) * STRUCT_PAGE
    return own, others + (inputs.cma if cma_at is not None else 0), cma_at


def check_mem(inputs: CrashMemoryInputs, mem: int, boot: int | None) -> MemoryCheck:
    own, others, cma_at = _reservations(inputs, mem)
    available = max(0, mem - own - others)
    movable = available + (inputs.cma if cma_at is not None else 0)
    memory_ok = None if boot is None else available >= boot and movable >= boot + inputs.files
    return MemoryCheck(mem, available, cma_at, inputs.files <= available // 2, memory_ok)


def measured_facts(inputs: CrashMemoryInputs, mem: int, available: int) -> tuple[int, int]:
    """(own reservations, boot allocations) from a run that reached init in mem=, its "Memory: NK/MK
    available" line saying `available`: the boot needed no more than what was left after the files."""
    _, others, _ = _reservations(inputs, mem)
    return mem - available - others, available - inputs.files


def page_rounded(sizes: Sequence[int]) -> int:
    return sum(align_up(n, PAGE) for n in sizes)


def smallest_mem(inputs: CrashMemoryInputs, from_mem: int, boot: int | None, limit: int) -> MemoryCheck | None:
    """The first whole-MiB mem= from `from_mem` (the layout's) up to `limit` that meets both rules."""
    mem = align_up(from_mem, MIB)
    while mem <= limit:
        check = check_mem(inputs, mem, boot)
        if check.ok:
            return check
        mem += MIB
    return None
