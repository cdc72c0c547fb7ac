"""`testbench matrix`: run a matrix or one shard of it, list its cells and shards for a CI system, and store
the cells' durations for the next split. Thin: matrix.py runs, shard.py splits, report/ writes."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .errors import UserError
from .matrix import DEFAULT_MATRIX, RunMode, identity, load_matrix, run_matrix
from .shard import costs, listing, load_durations, parse_shard, select, store_durations
from .verdict import UNTIL

FILTERS = ("machine", "ram", "initrd", "placement")


def _progress(done: int, total: int, result: dict, elapsed: float) -> None:
    counts = f"{result['cell']['id']}: {result['verdict']}"
    line = f"\r[{done}/{total}] {elapsed:6.0f}s  {counts:<70}"
    end = "\n" if done == total or not sys.stderr.isatty() else ""
    print(line if sys.stderr.isatty() else line.lstrip("\r"), end=end, file=sys.stderr, flush=True)


def _print_listing(data: dict) -> None:
    for shard in data["shards"]:
        print(f"shard {shard['shard']}: {len(shard['cells'])} cells, ~{shard['cost_s']:.0f} s")
    for cell in data["cells"]:
        print(f"  {cell['shard']:>5}  {cell['cost_s']:6.1f} s ({cell['cost_from']:<9})  {cell['id']}")


def cmd_matrix(args: argparse.Namespace) -> int:
    from .inputs.images import load_images
    from .report.outputs import verdict_counts, write_matrix_outputs

    only = {axis: getattr(args, axis) or [] for axis in FILTERS}
    config = Path(args.config) if args.config else DEFAULT_MATRIX
    cells = load_matrix(config, only)
    durations = load_durations(Path(args.durations) if args.durations else None)
    spec = parse_shard(args.shard) if args.shard else None
    if (args.json or args.shards) and not args.list:
        raise UserError("--json and --shards go with --list")
    if spec and args.shards and args.shards != spec.total:
        raise UserError(f"--shard {spec.name} and --shards {args.shards}: give one N")
    chosen = select(cells, spec, durations) if spec else cells
    if args.list:
        total = args.shards or (spec.total if spec else 1)
        data = {"matrix": str(config)} | listing(cells, total, durations)
        if spec:
            data["cells"] = [c for c in data["cells"] if c["shard"] == spec.name]
        if args.json:
            print(json.dumps(data, separators=(",", ":")))  # one line: CI systems read it as one output
        else:
            _print_listing(data)
        return 0

    load_images()  # a missing cache is one clear line here, not 54 errors
    mode = RunMode.from_flags(args.no_observe, args.until, args.no_snapshot, args.full_hash)
    ident = identity(config, only, mode)  # before the run: the bench that ran is the one that started
    out = Path(args.out) if args.out else Path("out") / f"matrix-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    jobs = args.jobs or max(1, (os.cpu_count() or 2))
    part = f" (shard {spec.name} of {len(cells)} cells)" if spec else ""
    print(f"[testbench] {len(chosen)} cells{part}, {jobs} at a time, into {out}", file=sys.stderr)
    started = time.monotonic()
    cost = costs(chosen, durations)
    results = run_matrix(chosen, out, jobs, _progress, mode, cost=lambda cell: cost[cell.id].seconds)
    wall = time.monotonic() - started
    for result in results:
        result["shard"] = spec.name if spec else None
    verdicts = verdict_counts(results)
    unexpected = [r["cell"]["id"] for r in results if not r["expected_ok"]]
    summary = {
        "cells": len(results),
        "wall_seconds": round(wall, 1),
        "jobs": jobs,
        "mode": mode.to_dict(),
        "verdicts": verdicts,
        "unexpected": unexpected,
        "identity": ident,
        "shard": spec.name if spec else None,
        "matrix_cells": [cell.to_dict() for cell in cells],
        "shard_cells": [cell.id for cell in chosen],
    }
    paths = write_matrix_outputs(out, results, summary)
    if args.store_durations:
        from .report.outputs import durations as measured

        stored = store_durations(measured(results), Path(args.durations) if args.durations else None)
        print(f"durations: {stored}")
    print(f"{len(results)} cells in {wall:.0f}s: {verdicts}; unexpected verdicts: {len(unexpected)}")
    for cell_id in unexpected:
        print(f"  unexpected: {cell_id}")
    print(f"report: {paths['index']}  junit: {paths['junit']}")
    return 1 if unexpected or verdicts["error"] else 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("matrix", help="run a matrix of cases (or one shard of it) and write a report")
    parser.add_argument("--config", help="matrix TOML (default images/matrix.toml)")
    parser.add_argument("-n", "--jobs", type=int, help="cells at a time (default: the number of cores)")
    parser.add_argument("--out", help="report dir (default out/matrix-<time>)")
    for axis in FILTERS:
        parser.add_argument(f"--{axis}", action="append", help=f"only these {axis} values (repeatable)")
    parser.add_argument(
        "--until",
        choices=UNTIL,
        help="kernel-entry: layout verdicts from the ground truth, no stage-2 boot (default init)",
    )
    parser.add_argument(
        "--no-observe",
        action="store_true",
        help="judge from the console alone, without the gdbstub stops and segment diffs (stage 2 then "
        "hashes the whole payload)",
    )
    parser.add_argument("--no-snapshot", action="store_true", help="boot stage 1 in every cell")
    parser.add_argument(
        "--full-hash",
        action="store_true",
        help="stage 2 hashes every payload in full, not a sample of a large one (see the README)",
    )
    parser.add_argument(
        "--shard",
        metavar="K/N",
        help="run only shard K of N: a deterministic, cost-balanced part of the cells (report merge joins them)",
    )
    parser.add_argument("--list", action="store_true", help="print the cells and their shards instead of running")
    parser.add_argument("--json", action="store_true", help="with --list: one line of JSON, for a CI system")
    parser.add_argument("--shards", type=int, metavar="N", help="with --list: split into N shards (default 1)")
    parser.add_argument(
        "--durations",
        metavar="FILE",
        help="cell durations the split balances (default images/durations.toml; a durations.json works too)",
    )
    parser.add_argument(
        "--store-durations",
        action="store_true",
        help="after the run, fold the cells' wall seconds into the durations file",
    )
    parser.set_defaults(func=cmd_matrix)
