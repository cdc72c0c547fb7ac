"""A matrix of cases from a TOML file: axes, exclusions, expected verdicts; `testbench matrix` runs it.

Each cell runs as its own `testbench run` process (so a crash or a hang stays inside one cell, and the
runner's PR_SET_PDEATHSIG chain kills every QEMU if the matrix itself is killed), N at a time, with a live
progress line. The results land in DIR/results.json and DIR/index.html, one artifact dir per cell.
"""

import argparse
import itertools
import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from .datafiles import data_path
from .errors import UserError
from .sizes import parse_size
from .verdict import UNTIL

DEFAULT_MATRIX = data_path("matrix.toml")
AXES = ("machine", "ram", "initrd", "placement", "kernel", "kexec", "memmap")
STAGE2_BASE = 1 << 20  # busybox and init around the payload; only moves where the DTB lands


@dataclass(frozen=True)
class Cell:
    machine: str
    ram: str
    initrd: str
    placement: str  # "default", "advised", or literal kexec args such as "--image-size=0x2000000"
    kernel: str = "debian"
    kexec: str = "debian"
    memmap: str = "plain"  # images/memmaps.toml
    expect: str | None = None

    @property
    def id(self) -> str:
        parts = [
            self.machine,
            self.ram,
            Path(self.kernel).name.replace(":", "-"),
            f"initrd{self.initrd}",
            "imagesize" if self.placement == "advised" else self.placement.lstrip("-").replace("=", ""),
        ]
        if self.kexec != "debian":
            parts.append(f"kexec-{Path(self.kexec).name.replace(':', '-')}")
        if self.memmap != "plain":
            parts.append(self.memmap)
        return "-".join(parts)

    def to_dict(self) -> dict:
        return {axis: getattr(self, axis) for axis in AXES} | {"id": self.id, "expect": self.expect}


def _matches(rule: dict, values: dict) -> bool:
    return all(str(values.get(k)) == str(v) for k, v in rule.items() if k != "verdict")


def load_matrix(path: Path | None = None, only: dict[str, list[str]] | None = None) -> list[Cell]:
    path = path or DEFAULT_MATRIX
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"matrix file {path}: no such file") from None
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"matrix file {path}: {err}") from None
    axes = data.get("axes", {})
    unknown = set(axes) - set(AXES)
    if unknown:
        raise UserError(f"matrix file {path}: unknown axes {sorted(unknown)}; known: {', '.join(AXES)}")
    for axis, chosen in (only or {}).items():
        if chosen:
            axes[axis] = chosen
    lists = [axes.get(axis, [Cell.__dataclass_fields__[axis].default]) for axis in AXES]
    cells = []
    for combo in itertools.product(*lists):
        values = dict(zip(AXES, combo, strict=True))
        if any(_matches(rule, values) for rule in data.get("exclude", [])):
            continue
        expect = next((rule["verdict"] for rule in data.get("expect", []) if _matches(rule, values)), None)
        cells.append(Cell(**values, expect=expect))
    return cells


def kexec_args_for(cell: Cell) -> list[str]:
    """The kexec -l arguments of a cell; `advised` asks the oracle for this cell's smallest safe size."""
    if cell.placement == "default":
        return []
    if cell.placement != "advised":
        return cell.placement.split()
    from .inputs.images import kernel_path
    from .inputs.memmap import get_memmap
    from .inputs.zimage import read_zimage
    from .machines import get_machine
    from .oracle import DEFAULT_VERSION, advise

    machine = get_machine(cell.machine)
    kernel = kernel_path(cell.kernel)
    ram = get_memmap(cell.memmap).ram_ranges(machine.ram_base, parse_size(cell.ram))
    advice = advise(
        read_zimage(kernel),
        ram,
        DEFAULT_VERSION,
        initrd_size=parse_size(cell.initrd) + STAGE2_BASE,
        dtb_size=machine.dtb_size,
    )
    return [f"--image-size={advice.image_size:#x}"] if advice.needed else []


@dataclass(frozen=True)
class RunMode:
    """How every cell runs. By default with the emulator's ground truth (a cell passes only when the
    segments are intact at kernel entry and the oracle agrees) and from the stage-1 snapshots."""

    observe: bool = True
    until: str = "init"  # or "kernel-entry": layout verdicts only, no stage-2 boot
    snapshot: bool = True

    @classmethod
    def from_flags(cls, no_observe: bool, until: str | None, no_snapshot: bool) -> "RunMode":
        return cls(observe=not no_observe, until=until or "init", snapshot=not no_snapshot)


def run_command(cell: Cell, out: Path, mode: RunMode = RunMode()) -> list[str]:
    args = [
        sys.executable,
        "-m",
        "testbench.cli",
        "run",
        "--machine",
        cell.machine,
        "--ram",
        cell.ram,
        "--initrd-size",
        cell.initrd,
        "--kernel",
        cell.kernel,
        "--kexec",
        cell.kexec,
        "--out",
        str(out),
        "--until",
        mode.until,
        "--memmap",
        cell.memmap,
    ]
    args += [] if mode.observe else ["--no-observe"]
    args += ["--no-snapshot"] if not mode.snapshot else []
    extra = kexec_args_for(cell)
    return args + ([f"--kexec-args={' '.join(extra)}"] if extra else [])


def profile_order(cells: list[Cell]) -> list[Cell]:
    """Round-robin over stage-1 profiles (machine, RAM): the first cells of a run each boot and save a
    different profile side by side, instead of the second worker waiting for the first one's snapshot."""
    groups: dict[tuple[str, str], list[Cell]] = {}
    for cell in cells:
        groups.setdefault((cell.machine, cell.ram), []).append(cell)
    rounds = itertools.zip_longest(*groups.values())
    return [cell for round_ in rounds for cell in round_ if cell is not None]


def _die_with_parent() -> None:
    import ctypes

    # SIGTERM, not SIGKILL: the cell's runner must get the chance to stop its own QEMU.
    ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)


def run_cell(cell: Cell, out: Path, mode: RunMode = RunMode()) -> dict:
    """Run one cell in its own process; returns its result.json (or an `error` record)."""
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        command = run_command(cell, out, mode)
    except UserError as err:
        return {"cell": cell.to_dict(), "verdict": "error", "phase": "boot1", "reasons": [str(err)]}
    done = subprocess.run(command, capture_output=True, text=True, preexec_fn=_die_with_parent)
    result_path = out / "result.json"
    if result_path.exists():
        result = json.loads(result_path.read_text())
    else:
        result = {
            "verdict": "error",
            "phase": "boot1",
            "reasons": [done.stderr.strip()[-500:] or f"runner exited {done.returncode}"],
        }
    result["cell"] = cell.to_dict()
    result["wall_seconds"] = round(time.monotonic() - started, 2)
    result["expected_ok"] = cell.expect is None or result["verdict"] == cell.expect
    return result


def run_matrix(cells: list[Cell], out: Path, jobs: int, progress=None, mode: RunMode = RunMode()) -> list[dict]:
    results: list[dict] = []
    started = time.monotonic()
    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        futures = {pool.submit(run_cell, cell, out / cell.id, mode): cell for cell in profile_order(cells)}
        for future in as_completed(futures):
            results.append(future.result())
            if progress:
                progress(len(results), len(cells), results[-1], time.monotonic() - started)
    except BaseException:
        # Ctrl-C / SIGTERM: start no queued cell; the running ones die with us (their runners have
        # PR_SET_PDEATHSIG, and each runner's QEMU dies with its runner).
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    order = {cell.id: i for i, cell in enumerate(cells)}
    return sorted(results, key=lambda r: order[r["cell"]["id"]])


def _progress(done: int, total: int, result: dict, elapsed: float) -> None:
    counts = f"{result['cell']['id']}: {result['verdict']}"
    line = f"\r[{done}/{total}] {elapsed:6.0f}s  {counts:<70}"
    end = "\n" if done == total or not sys.stderr.isatty() else ""
    print(line if sys.stderr.isatty() else line.lstrip("\r"), end=end, file=sys.stderr, flush=True)


def cmd_matrix(args: argparse.Namespace) -> int:
    from .inputs.images import load_images
    from .report.html import write_matrix_report

    load_images()  # a missing cache is one clear line here, not 54 errors
    only = {axis: getattr(args, axis) for axis in ("machine", "ram", "initrd", "placement")}
    cells = load_matrix(Path(args.config) if args.config else None, only)
    out = Path(args.out) if args.out else Path("out") / f"matrix-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    jobs = args.jobs or max(1, (os.cpu_count() or 2))
    print(f"[testbench] {len(cells)} cells, {jobs} at a time, into {out}", file=sys.stderr)
    started = time.monotonic()
    mode = RunMode.from_flags(args.no_observe, args.until, args.no_snapshot)
    results = run_matrix(cells, out, jobs, _progress, mode)
    wall = time.monotonic() - started
    verdicts = {v: sum(r["verdict"] == v for r in results) for v in ("pass", "fail", "error")}
    unexpected = [r["cell"]["id"] for r in results if not r["expected_ok"]]
    summary = {
        "cells": len(results),
        "wall_seconds": round(wall, 1),
        "mode": mode.__dict__,
        "verdicts": verdicts,
        "unexpected": unexpected,
    }
    (out / "results.json").write_text(json.dumps({"summary": summary, "results": results}, indent=2) + "\n")
    write_matrix_report(out, results, summary)
    print(f"{len(results)} cells in {wall:.0f}s: {verdicts}; unexpected verdicts: {len(unexpected)}")
    for cell_id in unexpected:
        print(f"  unexpected: {cell_id}")
    print(f"report: {out / 'index.html'}")
    return 1 if unexpected or verdicts["error"] else 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("matrix", help="run a matrix of cases and write an HTML report")
    parser.add_argument("--config", help="matrix TOML (default images/matrix.toml)")
    parser.add_argument("-n", "--jobs", type=int, help="cells at a time (default: the number of cores)")
    parser.add_argument("--out", help="report dir (default out/matrix-<time>)")
    for axis in ("machine", "ram", "initrd", "placement"):
        parser.add_argument(f"--{axis}", action="append", help=f"only these {axis} values (repeatable)")
    parser.add_argument(
        "--until",
        choices=UNTIL,
        help="kernel-entry: layout verdicts from the ground truth, no stage-2 boot (default init)",
    )
    parser.add_argument(
        "--no-observe",
        action="store_true",
        help="judge from the console alone, without the gdbstub stops and segment diffs",
    )
    parser.add_argument("--no-snapshot", action="store_true", help="boot stage 1 in every cell")
    parser.set_defaults(func=cmd_matrix)
