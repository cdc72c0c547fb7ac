"""`testbench replay`: check any placement of zImage, initrd and DTB in seconds, without a stage 1 (the
command line is replay_cli.py).

QEMU starts paused with no -kernel; the generic loader device puts each file at its address; the gdbstub
sets the boot registers of the ARM Linux boot protocol (r0 = 0, r1 = ~0: no machine id, r2 = the DTB) and
PC = the zImage. The paused state is the first stop; then the same kernel-entry stop, dumps and diffs as
`testbench run --observe` run, and the oracle judges the same addresses. This is how a board report, or
another loader's placement (U-Boot's bootz addresses, say), is checked.

With a generated stage-2 initrd (--initrd-size, or --from-log without --initrd: one of the log's size) the
replay goes on after the kernel entry to the stage-2 init's marker (--until init), so a layout passes only
when the second kernel reaches init with the payload, the DTB and the command line intact. There is no
kexec to write /chosen, so the bench does: bootargs and linux,initrd-start/-end match the layout, /memory
the RAM size, and rng-seed is dropped (the kernel NOPs it in place after reading it, so the blob it exposes
could never match; kexec, too, hands over a DTB whose rng-seed the first kernel consumed).
"""

from __future__ import annotations

import hashlib
import random
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .emulator.qemu import QemuProcess, QemuSpec, qemu_binary
from .errors import UserError
from .inputs import dtb
from .inputs.initramfs import Stage2Initrd, build_stage2_initrd
from .inputs.kexeclog import KexecLog, Placed, Segment
from .inputs.memmap import dump_qemu_dtb
from .inputs.zimage import read_zimage
from .machines import Machine
from .observe.observer import Observer
from .observe.plan import make_plan
from .observe.stage2 import NOT_WATCHED, finish_run
from .oracle import analyze
from .report.artifacts import write_json_atomic, write_replay_svg
from .verdict import Verdict, judge_stage2, signature_reasons

# ARM boot protocol (Documentation/arm/booting.rst): r0 = 0, r1 = machine type (~0: none, use the DTB),
# r2 = DTB. CPSR = SVC mode with IRQ, FIQ and async aborts masked, as a bootloader leaves it.
R1_NO_MACHINE = 0xFFFFFFFF
CPSR_SVC_MASKED = 0x1D3


@dataclass(frozen=True)
class ReplayRequest:
    """One replay, its inputs checked (`request_from_args` makes it from the command line)."""

    machine: Machine
    ram: int
    out: Path
    kernel: Path
    kernel_at: int  # absolute addresses
    dtb_at: int
    initrd_at: int | None = None
    initrd: Path | None = None  # the user's initrd; None: generated (initrd_size / log_initrd_size) or none
    initrd_size: int | None = None  # a stage-2 initrd with a payload of this many bytes
    log_initrd_size: int | None = None  # --from-log: the log's initrd size (a stand-in of exactly that size)
    seed: int = 1
    dtb: Path | None = None  # None: the machine's own DTB
    until: str | None = None  # None: init with a generated initrd, kernel-entry otherwise
    decompress_deadline: float | None = None  # seconds before the factor; None: STOP_DEADLINES
    halt_check: bool = True  # False: wait out the deadline even when the CPU is halted for good
    # /memory starts here instead of at the board's RAM base: RAM off a 128 MiB boundary (kernel_address's
    # fallback, Linux >= 5.12) or a board whose first RAM is reserved; QEMU's RAM below it stays unused
    memory_start: int | None = None
    kernel_version: str | None = None  # of the zImage, when known (it decides the kernel_address fallback)

    @property
    def bootargs(self) -> str:
        m = self.machine
        return " ".join([f"console={m.console}", *m.stage2_cmdline, "panic=-1"])


def _board_dtb(m: Machine, ram: int, out: Path) -> Path:
    """The DTB the machine boots with: QEMU's own for a board that generates it (dumpdtb), else the kernel
    package's (the image cache is read only then: a virt replay of the user's own files needs none)."""
    target = out / "board.dtb"
    if m.qemu_generates_dtb:
        target.write_bytes(dump_qemu_dtb(qemu_binary(), m, ram))
        return target
    from .inputs.images import load_images

    source = m.board_dtb(load_images().dtb_dir)
    assert source is not None
    shutil.copyfile(source, target)
    return target


def _patch_dtb(path: Path, initrd: tuple[int, int] | None, bootargs: str, ram: tuple[int, int] | None) -> None:
    """Write what a loader writes into /chosen, so the kernel finds the initrd and command line; with `ram`,
    make /memory say the RAM QEMU really has (a board DTB says what the board was sold with)."""
    data = path.read_bytes()
    try:
        tree = dtb.Editor(data)
        tree.set_string("/chosen", "bootargs", bootargs)
        tree.delete("/chosen", "rng-seed")  # see the module docstring
        if initrd is not None:  # one cell each, as a loader writes them for a 32-bit start and end
            tree.set_cells("/chosen", "linux,initrd-start", (initrd[0], 1))
            tree.set_cells("/chosen", "linux,initrd-end", (initrd[0] + initrd[1], 1))
        if ram is not None:
            acells, scells = tree.cells("/", "#address-cells"), tree.cells("/", "#size-cells")
            nodes = [n for n in dtb.subnodes(data, "/") if n == "memory" or n.startswith("memory@")]
            if not nodes or acells not in (1, 2):
                raise UserError(f"{path}: expected a /memory node and #address-cells 1 or 2, found {nodes}, {acells}")
            tree.set_cells(f"/{nodes[0]}", "reg", (ram[0], acells), (ram[1], scells))
            for other in nodes[1:]:  # ecx-2000's second bank: QEMU keeps one /memory, so does the replay
                tree.set_string(f"/{other}", "status", "disabled")
        path.write_bytes(bytes(tree))
    except dtb.DtbError as err:
        raise UserError(f"{path}: cannot edit it as a device tree ({err})") from None


def stage2_initrd_of_size(images: Any, out: Path, size: int, seed: int) -> Stage2Initrd | None:
    """A stage-2 initrd of exactly `size` bytes (a board log's initrd size): the payload fills what the
    busybox archive leaves, and zeros pad the rest (the kernel skips zeros between cpio archives).
    None when `size` cannot even hold the busybox archive."""
    empty = build_stage2_initrd(images, out, 0, seed)
    # The payload's cpio header, name and padding grow with the payload by at most 3 bytes of alignment.
    payload = size - empty.size - 4
    if payload < 0:
        out.unlink()
        return None
    built = build_stage2_initrd(images, out, payload, seed)
    with out.open("ab") as handle:
        handle.write(bytes(size - built.size))
    return replace(built, size=size)


def _check_layout(placed: dict[str, tuple[int, int]], ram: tuple[int, int]) -> None:
    spans = sorted((a, a + n, role) for role, (a, n) in placed.items())
    for a, e, role in spans:
        if a < ram[0] or e > ram[1]:
            raise UserError(f"{role} [{a:#x}, {e:#x}) is outside RAM [{ram[0]:#x}, {ram[1]:#x})")
    for (a1, e1, r1), (a2, _e2, r2) in zip(spans, spans[1:], strict=False):
        if a2 < e1:
            raise UserError(f"{r1} [{a1:#x}, {e1:#x}) and {r2} at {a2:#x} overlap as loaded")
    if placed["kernel"][0] & 3:
        raise UserError(f"kernel address {placed['kernel'][0]:#x} is not word-aligned")


def _initrd(request: ReplayRequest) -> tuple[Path | None, Stage2Initrd | None]:
    """The initrd to load: the user's file, a generated stage-2 one (--initrd-size, or the log's size), or
    random bytes of the log's size when even the busybox archive does not fit in it."""
    if request.initrd is not None:
        return request.initrd, None
    if request.initrd_at is None:
        return None, None
    from .inputs.images import load_images

    path = request.out / "initrd.img"
    if request.initrd_size is not None:
        return path, build_stage2_initrd(load_images(), path, request.initrd_size, request.seed)
    wanted = request.log_initrd_size or (1 << 20)
    built = stage2_initrd_of_size(load_images(), path, wanted, request.seed)
    if built is None:  # only its place matters then: stand in random bytes of the log's size
        path.write_bytes(random.Random(request.seed).randbytes(wanted))
    return path, built


def _judge_console(text: str, bootargs: str, built: Stage2Initrd | None, fdt_sha256: str, ended_by: str) -> Verdict:
    """The stage-2 verdict of a replay. Stop 2 proved the kernel was entered, and a replay has no 'Bye!':
    a silent console is the kernel phase dying, not a handoff. Without a stage-2 watch (layout only, or a
    stop never came, or a payload already clobbered at the kernel entry) the ground truth alone decides."""
    if ended_by in NOT_WATCHED:
        return Verdict("pass", "kernel")
    verdict = judge_stage2(text, bootargs, built.payload_sha256 if built else None, ended_by, fdt_sha256)
    if verdict.phase == "handoff":
        reasons = signature_reasons(text) or [f"the kernel was entered (stop 2) and printed nothing ({ended_by})"]
        verdict = Verdict("fail", "kernel", tuple(reasons))
    return verdict


def _inputs(files: dict[str, Path]) -> dict:
    """What ran, as in a case's result.json: each file's sha256, and the Debian suite and lock when the
    image cache is there (a replay of the user's own files on virt may not need it)."""
    from .inputs.checks import describe
    from .inputs.images import load_images

    described = {role: describe(role, path).to_dict() for role, path in files.items()}
    try:
        return {"debian": load_images().provenance(), **described}
    except UserError:
        return described


def replay(request: ReplayRequest) -> dict:
    """Load, stop, diff and judge one placement; the result as result.json has it (also written there)."""
    m, ram, out = request.machine, request.ram, request.out
    ram_range = (request.memory_start or m.ram_base, m.ram_base + ram)
    out.mkdir(parents=True, exist_ok=True)
    zimage = read_zimage(request.kernel)
    initrd, built = _initrd(request)
    until = request.until or ("init" if built is not None else "kernel-entry")
    bootargs = request.bootargs
    dtb = out / "replay.dtb"
    shutil.copyfile(request.dtb or _board_dtb(m, ram, out), dtb)
    initrd_span = None  # `is not None`: on a board with RAM at 0x0 an initrd may sit at address 0
    if initrd is not None and request.initrd_at is not None:
        initrd_span = (request.initrd_at, initrd.stat().st_size)
    memory: tuple[int, int] | None
    if request.memory_start is not None:
        memory = (ram_range[0], ram_range[1] - ram_range[0])
    else:
        memory = None if m.qemu_generates_dtb or request.dtb else (m.ram_base, ram)
    _patch_dtb(dtb, initrd_span, bootargs, memory)
    fdt_sha256 = hashlib.sha256(dtb.read_bytes()).hexdigest()
    placed = {"kernel": (request.kernel_at, zimage.size), "dtb": (request.dtb_at, dtb.stat().st_size)}
    if initrd_span:
        placed["initrd"] = initrd_span
    _check_layout(placed, ram_range)
    files = {"kernel": request.kernel, "dtb": dtb} | ({"initrd": initrd} if initrd is not None else {})
    log = KexecLog(
        memory_ranges=(ram_range,),
        zimage_size=zimage.size,
        file_size=None,
        zimage_requires=None,
        tag_offset=None,
        tag_size=None,
        text_data=None,
        bss=None,
        total=None,
        kernel_space=None,
        kernel=Placed(*placed["kernel"]),
        initrd=Placed(*placed["initrd"]) if "initrd" in placed else None,
        dtb=Placed(*placed["dtb"]),
        entry=placed["kernel"][0],
        segments=tuple(Segment(i, None, n, a, n) for i, (a, n) in enumerate(placed.values())),
        decompressor_copy=None,
        format="replay",
    )
    prediction = analyze(log, zimage=zimage, memory=(ram_range,), kernel_version=request.kernel_version)
    plan = make_plan(log, zimage, ram_range, prediction, files, bootargs)
    # Without -kernel, QEMU's virt puts its own DTB as a ROM blob at RAM base (machine data `dtb_rom`), and a
    # loader image overlapping it makes QEMU refuse to start. Such files are written over the gdbstub
    # instead, after reset has copied the blob in, so ours win. Everything else uses the loader device.
    rom = (m.ram_base, m.ram_base + m.dtb_rom)
    by_gdb = {r: v for r, v in placed.items() if v[0] < rom[1] and v[0] + v[1] > rom[0]}
    spec = QemuSpec(
        machine=m,
        ram=ram,
        kernel=None,
        initrd=None,
        append="",
        dtb=None,
        share=None,
        loaders=tuple((files[r], a) for r, (a, _n) in placed.items() if r not in by_gdb),
    )
    deadlines = {"decompress": request.decompress_deadline} if request.decompress_deadline else None
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    with QemuProcess(spec, out, gdb=True) as qemu:
        observer = Observer(
            qemu.sockets.gdb, qemu.pmemsave, plan, out / "observe", deadlines, spin_check=request.halt_check
        )
        try:
            first = observer.arm_at_entry(
                {
                    "r0": 0,
                    "r1": R1_NO_MACHINE,
                    "r2": placed["dtb"][0],
                    "cpsr": CPSR_SVC_MASKED,
                    "pc": placed["kernel"][0],
                },
                {placed[r][0]: files[r].read_bytes() for r in by_gdb},
            )
            observation = observer.observe(first.at, first)
        finally:
            observer.close()
        resumed = time.monotonic()
        kernel_stop = observation.stop("kernel")
        if kernel_stop is not None and kernel_stop.seconds is not None:
            timings["stop_kernel"] = kernel_stop.seconds
        if observation.hang is not None:  # how long the bench waited before it halted the VM
            timings[f"{observation.hang.phase}_waited"] = observation.hang.waited
        mib = (initrd.stat().st_size >> 20) + 1 if initrd is not None else 1
        end = finish_run(
            qemu,
            observer,
            observation,
            prediction,
            lambda text, ended_by: _judge_console(text, bootargs, built, fdt_sha256, ended_by),
            until=until,
            start=0,
            mib=mib,
            resumed_at=resumed,
        )
        if end.watched:
            timings["stage2"] = time.monotonic() - resumed
    timings["replay"] = time.monotonic() - t0
    verdict = end.verdict
    if not end.watched and verdict.verdict == "pass":
        verdict = replace(
            verdict,
            reasons=(
                "kernel entry reached with every payload segment intact; "
                "the oracle agrees (--until kernel-entry: stage 2 not watched)",
            ),
        )
    assert end.observation is not None and end.oracle is not None
    oracle = end.oracle.to_dict()
    result = {
        **verdict.to_dict(),
        "machine": m.name,
        "ram": {"base": m.ram_base, "size": ram},
        "placement": {role: {"address": a, "size": n, "file": str(files[role])} for role, (a, n) in placed.items()},
        "until": until,
        "text_offset": plan.text_offset,
        "observed": end.observation.to_dict(),
        "predicted": prediction.to_dict(),
        "oracle_agrees": oracle["agrees"],
        "oracle_difference": oracle["differences"],
        "oracle": oracle,
        "stage2": end.stage2.to_dict() if end.stage2 is not None else None,
        "expected": {
            "cmdline": bootargs,
            "fdt_sha256": fdt_sha256,
            "payload_sha256": built.payload_sha256 if built else None,
        },
        "inputs": _inputs(files),
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }
    write_replay_svg(out, result)
    write_json_atomic(out / "result.json", result)
    return result
