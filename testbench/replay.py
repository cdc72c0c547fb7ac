"""`testbench replay`: check any placement of zImage, initrd and DTB in seconds, without a stage 1.

QEMU starts paused with no -kernel; the generic loader device puts each file at its address; the gdbstub
sets the boot registers of the ARM Linux boot protocol (r0 = 0, r1 = ~0: no machine id, r2 = the DTB) and
PC = the zImage. The paused state is the first stop; then the same kernel-entry stop, dumps and diffs as
`testbench run --observe` run, and the oracle judges the same addresses. This is how a board report, or
another loader's placement (U-Boot's bootz addresses, say), is checked.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from .errors import BenchError, UserError
from .kexeclog import KexecLog, Placed, Segment, parse_kexec_log
from .machines import Machine, get_machine
from .observe import Observer, make_plan
from .oracle import analyze
from .qemu import QemuProcess, QemuSpec, qemu_binary
from .report.artifacts import write_json_atomic
from .sizes import parse_size
from .verdict import Verdict, compare_oracle, judge_observation
from .zimage import read_zimage

# ARM boot protocol (Documentation/arm/booting.rst): r0 = 0, r1 = machine type (~0: none, use the DTB),
# r2 = DTB. CPSR = SVC mode with IRQ, FIQ and async aborts masked, as a bootloader leaves it.
R1_NO_MACHINE = 0xFFFFFFFF
CPSR_SVC_MASKED = 0x1D3
QEMU_DTB_ROM = 1 << 20  # virt without -kernel: its DTB blob at RAM base (hw/arm/virt.c, for firmware)


def _address(text: str, base: int, what: str) -> int:
    """An absolute address, or `+OFFSET` relative to RAM base."""
    try:
        return base + parse_size(text[1:], what) if text.startswith("+") else int(text, 0)
    except ValueError:
        raise UserError(f"{what}: {text!r} is not an address (0x... or +offset from RAM base)") from None


def _file(path: str | None, role: str) -> Path | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{role} {path}: no such file")
    return p


def _board_dtb(m: Machine, ram: int, out: Path) -> Path:
    """The DTB the machine boots with: QEMU's own for virt (dumpdtb), the kernel package's otherwise."""
    target = out / "board.dtb"
    if m.qemu_generates_dtb:
        run = subprocess.run([qemu_binary(), "-M", f"{m.qemu_machine},dumpdtb={target}", "-cpu", m.cpu,
                              "-m", f"{ram >> 20}M", "-display", "none"], capture_output=True, text=True)
        if run.returncode != 0 or not target.exists():
            raise BenchError(f"qemu could not dump the {m.name} DTB: {run.stderr.strip()[:200]}")
        return target
    from .images import load_images

    source = load_images().dtb_dir / m.dtb
    shutil.copyfile(source, target)
    return target


def _patch_dtb(dtb: Path, initrd: tuple[int, int] | None, bootargs: str) -> None:
    """Write what a loader writes into /chosen, so the kernel would find the initrd and command line."""
    cmds = [["fdtput", "-c", str(dtb), "/chosen"], ["fdtput", "-t", "s", str(dtb), "/chosen", "bootargs", bootargs]]
    if initrd is not None:
        cmds += [["fdtput", "-t", "x", str(dtb), "/chosen", "linux,initrd-start", f"{initrd[0]:x}"],
                 ["fdtput", "-t", "x", str(dtb), "/chosen", "linux,initrd-end", f"{initrd[0] + initrd[1]:x}"]]
    for cmd in cmds:
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0 and "-c" not in cmd:
            raise UserError(f"{dtb}: cannot edit /chosen with fdtput: {run.stderr.strip()}")


def _addresses(args: argparse.Namespace, m: Machine) -> dict[str, int | None]:
    if args.from_log:
        text = _file(args.from_log, "--from-log")
        assert text is not None
        log = parse_kexec_log(text.read_text(errors="replace"))
        if not log.memory_ranges or log.kernel is None:
            raise UserError(f"{args.from_log}: the log needs MEMORY RANGES and a 'Kernel:' line to replay")
        base = log.memory_ranges[0][0]
        return {"kernel": log.kernel.address - base + m.ram_base,
                "initrd": log.initrd.address - base + m.ram_base if log.initrd else None,
                "dtb": log.dtb.address - base + m.ram_base if log.dtb else None,
                "initrd_size": log.initrd.size if log.initrd else None}
    if args.kernel_at is None or args.dtb_at is None:
        raise UserError("replay needs --kernel-at and --dtb-at (and --initrd-at with --initrd), or --from-log")
    return {"kernel": _address(args.kernel_at, m.ram_base, "--kernel-at"),
            "initrd": _address(args.initrd_at, m.ram_base, "--initrd-at") if args.initrd_at else None,
            "dtb": _address(args.dtb_at, m.ram_base, "--dtb-at"), "initrd_size": None}


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


def replay(args: argparse.Namespace) -> dict:
    m = get_machine(args.machine)
    ram = parse_size(args.ram, "--ram") if args.ram else m.default_ram
    m.check_ram(ram)
    ram_range = (m.ram_base, m.ram_base + ram)
    out = Path(args.out or f"out/replay-{m.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    from .images import kernel_path

    kernel = kernel_path(args.kernel) if args.kernel in (None, "debian") else _file(args.kernel, "kernel")
    zimage = read_zimage(kernel)
    at = _addresses(args, m)
    initrd = _file(args.initrd, "initrd")
    if initrd is None and at["initrd"] is not None:
        # The log names an initrd we do not have: stand in random bytes of its size (only its place matters).
        initrd = out / "initrd.bin"
        initrd.write_bytes(random.Random(1).randbytes(at["initrd_size"] or (1 << 20)))
    if initrd is not None and at["initrd"] is None:
        raise UserError("--initrd needs --initrd-at (or an 'Initrd:' line in --from-log)")
    bootargs = " ".join([f"console={m.console}", *m.stage2_cmdline, "panic=-1"])
    dtb = out / "replay.dtb"
    shutil.copyfile(_file(args.dtb, "dtb") or _board_dtb(m, ram, out), dtb)
    initrd_span = (at["initrd"], initrd.stat().st_size) if initrd is not None and at["initrd"] else None
    _patch_dtb(dtb, initrd_span, bootargs)
    placed = {"kernel": (at["kernel"], zimage.size), "dtb": (at["dtb"], dtb.stat().st_size)}
    if initrd_span:
        placed["initrd"] = initrd_span
    assert all(a is not None for a, _ in placed.values())
    _check_layout(placed, ram_range)  # type: ignore[arg-type]
    files = {"kernel": kernel, "dtb": dtb} | ({"initrd": initrd} if initrd is not None else {})
    log = KexecLog(memory_ranges=(ram_range,), zimage_size=zimage.size, file_size=None, zimage_requires=None,
                   tag_offset=None, tag_size=None, text_data=None, bss=None, total=None, kernel_space=None,
                   kernel=Placed(*placed["kernel"]),
                   initrd=Placed(*placed["initrd"]) if "initrd" in placed else None,
                   dtb=Placed(*placed["dtb"]), entry=placed["kernel"][0],
                   segments=tuple(Segment(i, None, n, a, n) for i, (a, n) in enumerate(placed.values())),
                   decompressor_copy=None, format="replay")
    prediction = analyze(log, zimage=zimage).to_dict()
    plan = make_plan(log, zimage, ram_range, prediction, files, bootargs)
    # Without -kernel, QEMU's virt puts its own DTB as a 1 MiB ROM blob at RAM base (for firmware), and a
    # loader image overlapping it makes QEMU refuse to start. Such files are written over the gdbstub
    # instead, after reset has copied the blob in, so ours win. Everything else uses the loader device.
    rom = (m.ram_base, m.ram_base + QEMU_DTB_ROM) if m.qemu_generates_dtb else (0, 0)
    by_gdb = {r: v for r, v in placed.items() if v[0] < rom[1] and v[0] + v[1] > rom[0]}
    spec = QemuSpec(machine=m, ram=ram, kernel=None, initrd=None, append="", dtb=None, share=None,
                    loaders=tuple((files[r], a) for r, (a, _n) in placed.items() if r not in by_gdb))
    t0 = time.monotonic()
    with QemuProcess(spec, out, gdb=True) as qemu:
        observer = Observer(qemu.sockets.gdb, qemu.pmemsave, plan, out / "observe")
        try:
            first = observer.arm_at_entry(
                {"r0": 0, "r1": R1_NO_MACHINE, "r2": placed["dtb"][0], "cpsr": CPSR_SVC_MASKED,
                 "pc": placed["kernel"][0]},
                {placed[r][0]: files[r].read_bytes() for r in by_gdb})
            observation = observer.observe(first.at, first)
        finally:
            observer.close()
    seconds = time.monotonic() - t0
    observed = observation.to_dict()
    oracle = compare_oracle(observed, prediction)
    verdict = judge_observation(Verdict("pass", "kernel"), observed, oracle)
    if verdict.verdict == "pass":
        verdict = replace(verdict, reasons=("kernel entry reached with every payload segment intact; "
                                            "the oracle agrees",))
    result = {**verdict.to_dict(), "machine": m.name, "ram": {"base": m.ram_base, "size": ram},
              "placement": {role: {"address": a, "size": n, "file": str(files[role])}
                            for role, (a, n) in placed.items()},
              "text_offset": plan.text_offset, "observed": observed, "predicted": prediction,
              "oracle_agrees": oracle["agrees"], "oracle_difference": oracle["differences"],
              "oracle": oracle, "timings": {"replay": round(seconds, 3)}}
    write_json_atomic(out / "result.json", result)
    return result


def handler(args: argparse.Namespace) -> int:
    result = replay(args)
    print(f"{result['verdict']} ({result['phase']}) in {result['timings']['replay']:.1f}s on {result['machine']}")
    for role, p in result["placement"].items():
        print(f"  {role:6} [{p['address']:#x}, {p['address'] + p['size']:#x})")
    for c in result["observed"]["clobbered"]:
        print(f"  clobbered {c['label']}")
    print(f"  oracle agrees: {result['oracle_agrees']}")
    for line in result["reasons"]:
        print(f"  - {line}")
    json.dump({"out": str(Path(result["observed"]["dumps"]).parent)}, sys.stdout)
    print()
    return {"pass": 0, "fail": 1}.get(result["verdict"], 2)


def register(subparsers) -> None:
    p = subparsers.add_parser("replay", help="replay a placement of zImage/initrd/DTB in QEMU (no stage 1) "
                              "and diff every segment at zImage and kernel entry")
    p.add_argument("--machine", required=True, help="machine profile")
    p.add_argument("--ram", help="RAM size (default: the machine's default)")
    p.add_argument("--kernel", default="debian", help="zImage: 'debian' or a path")
    p.add_argument("--initrd", help="initrd file (with --from-log and no --initrd: random bytes of the log's size)")
    p.add_argument("--dtb", help="DTB file (default: the machine's); /chosen gets bootargs and initrd")
    p.add_argument("--kernel-at", help="zImage address: 0x... absolute or +offset from RAM base")
    p.add_argument("--initrd-at", help="initrd address")
    p.add_argument("--dtb-at", help="DTB address")
    p.add_argument("--from-log", help="take the addresses from a kexec --debug log, relative to its RAM base")
    p.add_argument("--out", help="artifact dir (default out/replay-<machine>-<time>)")
    p.set_defaults(func=handler)
