"""RAM maps for stage 1 (images/memmaps.toml): holes made with /reserved-memory `no-map` regions.

A map other than `plain` gives stage 1 a DTB of its own: the board's DTB (QEMU's, dumped, for virt) with
the holes added. The first kernel then leaves them out of /proc/iomem's System RAM, kexec's locate_hole
works around them, and the second kernel inherits the same DTB. DTBs are cached by content.
"""

import hashlib
import subprocess
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

from ..datafiles import data_path
from ..errors import BenchError, UserError
from ..fileio import write_atomic
from ..machines import Machine
from ..sizes import format_size, parse_size
from .dtb import DtbError, Editor

MEMMAPS = data_path("memmaps.toml")
PLAIN = "plain"
STAGE1_INITRD_OFFSET = 128 << 20  # QEMU loads a 32-bit guest's initrd at base + min(RAM/2, 128 MiB)


@dataclass(frozen=True)
class MemMap:
    name: str
    no_map: tuple[tuple[int, int], ...] = ()  # (offset from the RAM base, size)

    def holes(self, ram_base: int) -> list[tuple[int, int]]:
        return [(ram_base + off, ram_base + off + size) for off, size in self.no_map]

    def ram_ranges(self, ram_base: int, ram: int) -> list[tuple[int, int]]:
        """System RAM as stage 1's /proc/iomem will list it: the bank minus the holes."""
        ranges, start = [], ram_base
        for lo, hi in sorted(self.holes(ram_base)):
            if lo > start:
                ranges.append((start, lo))
            start = max(start, hi)
        if start < ram_base + ram:
            ranges.append((start, ram_base + ram))
        return ranges

    def check(self, machine: Machine, ram: int) -> None:
        for off, size in self.no_map:
            if off + size > min(ram // 2, STAGE1_INITRD_OFFSET):
                raise UserError(
                    f"memory map {self.name}: the hole at +{format_size(off)} ({format_size(size)}) "
                    f"would cover stage 1's initramfs with {format_size(ram)} of RAM on {machine.name}"
                )


def load_memmaps(path: Path = MEMMAPS) -> dict[str, MemMap]:
    data = tomllib.loads(path.read_text())
    maps = {}
    for name, entry in data.items():
        pairs = entry.get("no_map", [])
        maps[name] = MemMap(name, tuple((parse_size(str(o), name), parse_size(str(s), name)) for o, s in pairs))
    return maps


def get_memmap(name: str) -> MemMap:
    maps = load_memmaps()
    if name not in maps:
        raise UserError(f"unknown memory map {name!r}; known: {', '.join(maps)} (images/memmaps.toml)")
    return maps[name]


def with_holes(board_dtb: bytes, holes: list[tuple[int, int]]) -> bytes:
    """The DTB with one /reserved-memory no-map node per hole (the kernel requires the node's cells to
    match the root's, and an empty `ranges`; a /reserved-memory the board has already is extended)."""
    try:
        tree = Editor(board_dtb)
        acells, scells = tree.cells("/", "#address-cells"), tree.cells("/", "#size-cells")
        tree.set_cells("/reserved-memory", "#address-cells", (acells, 1))
        tree.set_cells("/reserved-memory", "#size-cells", (scells, 1))
        tree.set_empty("/reserved-memory", "ranges")
        for lo, hi in holes:
            node = f"/reserved-memory/testbench-hole@{lo:x}"
            tree.set_cells(node, "reg", (lo, acells), (hi - lo, scells))
            tree.set_empty(node, "no-map")
        return bytes(tree)
    except DtbError as err:
        raise BenchError(f"adding the memory map's holes to the board DTB failed: {err}") from None


def stage1_dtb(cache_root: Path, board_dtb: bytes, memmap: MemMap, ram_base: int) -> Path:
    """The cached stage-1 DTB for `memmap` (content-keyed, written atomically for concurrent cases)."""
    # The key names the recipe too: a DTB written by another editor (dtc before libfdt) is another file.
    key = hashlib.sha256(b"libfdt\0" + board_dtb + repr(memmap.holes(ram_base)).encode()).hexdigest()[:20]
    out_dir = cache_root / "dtb"
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{memmap.name}-{key}.dtb"
    if not target.exists():
        write_atomic(target, with_holes(board_dtb, memmap.holes(ram_base)))
    return target


def _run(args: list[str], what: str) -> None:
    try:
        done = subprocess.run(args, capture_output=True, text=True, errors="replace")
    except FileNotFoundError:
        raise UserError(f"{args[0]} not found; install it with `apt-get install qemu-system-arm`") from None
    if done.returncode != 0:
        raise BenchError(f"{what} failed: {done.stderr.strip()[:300]}")


def dump_qemu_dtb(binary: str, machine: Machine, ram: int) -> bytes:
    """QEMU's own DTB for a board that generates one (virt), for this RAM size."""
    with tempfile.TemporaryDirectory(prefix="tb-dtb-") as tmp:
        target = Path(tmp) / "board.dtb"
        _run(
            [
                binary,
                "-M",
                f"{machine.qemu_machine_arg},dumpdtb={target}",
                "-cpu",
                machine.cpu,
                "-m",
                f"{ram >> 20}M",
                "-smp",
                str(machine.smp),
                *machine.qemu_args,
                "-display",
                "none",
            ],
            f"qemu dumpdtb for {machine.name}",
        )
        return target.read_bytes()
