"""`testbench report merge OUT DIR...`: the outputs of a matrix's shards (each DIR a `testbench matrix
--shard K/N` dir) as one results.json, index.html, junit.xml and durations.json in OUT.

Shards are refused, in one line, unless they ran the same matrix file (by sha256), selection and mode, the
same lock file and the same bench version: anything else would put two different experiments in one grid.
Cells no shard ran are reported (and shown) as `missing`, cells more than one shard ran as duplicates (the
first DIR's result is kept); either makes the merge exit 1, as an unexpected verdict does. Each cell's
artifact dir is hard-linked (or copied) into OUT, so the merged report's links work from OUT alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from ..errors import UserError
from .outputs import verdict_counts, write_matrix_outputs

# The identity fields that must agree, and how a refusal names them.
AGREE = (
    ("matrix", "another matrix file"),
    ("selection", "another selection of cells (--machine/--ram/--initrd/--placement)"),
    ("mode", "another run mode (--until/--no-observe/--no-snapshot/--full-hash)"),
    ("lock_sha256", "another lock file"),
    ("bench_version", "another bench version"),
)


def _read(directory: Path) -> dict:
    path = directory / "results.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"report merge: {directory} has no results.json (not a `testbench matrix` dir)") from None
    except ValueError as err:
        raise UserError(f"report merge: {path}: {err}") from None
    summary = data.get("summary") if isinstance(data, dict) else None
    if not isinstance(summary, dict) or not isinstance(data.get("results"), list):
        raise UserError(f"report merge: {path} is not a matrix's results.json")
    if not isinstance(summary.get("identity"), dict) or not isinstance(summary.get("matrix_cells"), list):
        raise UserError(f"report merge: {path} names no matrix identity (written by an older bench): rerun it")
    return data


def _show(key: str, value: object) -> str:
    if key == "matrix" and isinstance(value, dict):
        return f"{value.get('path')}, sha256 {str(value.get('sha256'))[:12]}"
    if isinstance(value, str) and len(value) == 64:
        return value[:12]
    return json.dumps(value, sort_keys=True)


def check_identity(shards: list[tuple[Path, dict]]) -> None:
    """One line (UserError) naming the first field on which a shard differs from the first shard."""
    first_dir, first = shards[0]
    base = first["summary"]["identity"]
    for directory, data in shards[1:]:
        ident = data["summary"]["identity"]
        for key, what in AGREE:
            mine, theirs = ident.get(key), base.get(key)
            if key == "matrix":
                mine, theirs = (mine or {}).get("sha256"), (theirs or {}).get("sha256")
            if mine != theirs:
                raise UserError(
                    f"report merge: {directory} ran {what} ({_show(key, ident.get(key))}) than {first_dir} "
                    f"({_show(key, base.get(key))}): refusing to merge them"
                )


def _link_tree(source: Path, target: Path) -> None:
    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)  # a merge into the same OUT again: this shard's cell replaces the old one
    elif target.exists() or target.is_symlink():
        target.unlink()
    shutil.copytree(source, target, symlinks=True, copy_function=link)


def merge(out: Path, dirs: list[Path]) -> tuple[list[dict], dict]:
    resolved = {d.resolve() for d in dirs}
    if out.resolve() in resolved:
        raise UserError(f"report merge: OUT {out} is one of the shard dirs; give a new dir")
    shards = [(d, _read(d)) for d in dirs]
    check_identity(shards)
    matrix_cells = shards[0][1]["summary"]["matrix_cells"]
    order = [c["id"] if isinstance(c, dict) else str(c) for c in matrix_cells]
    kept: dict[str, dict] = {}
    sources: dict[str, Path] = {}
    duplicates: list[str] = []
    for directory, data in shards:
        for result in data["results"]:
            cell_id = result["cell"]["id"]
            if cell_id in kept:
                duplicates.append(cell_id)
                continue
            kept[cell_id] = result
            sources[cell_id] = directory
    out.mkdir(parents=True, exist_ok=True)
    for cell_id, directory in sources.items():
        if (directory / cell_id).is_dir():
            _link_tree(directory / cell_id, out / cell_id)
    missing = [cell_id for cell_id in order if cell_id not in kept]
    by_id = {c["id"]: c for c in matrix_cells if isinstance(c, dict)}
    results = []
    for cell_id in order + [c for c in kept if c not in order]:
        if cell_id in kept:
            results.append(kept[cell_id])
        else:
            results.append(
                {
                    "cell": by_id.get(cell_id, {"id": cell_id}),
                    "verdict": "missing",
                    "phase": None,
                    "reasons": ["no shard ran this cell"],
                    "expected_ok": False,
                }
            )
    summaries = [data["summary"] for _, data in shards]
    summary = {
        "cells": len(results),
        # The shards ran side by side: the merged run took as long as its slowest shard.
        "wall_seconds": max(float(s.get("wall_seconds") or 0) for s in summaries),
        "shard_wall_seconds": [s.get("wall_seconds") for s in summaries],
        "mode": summaries[0].get("mode"),
        "verdicts": verdict_counts(results),
        "unexpected": [r["cell"]["id"] for r in results if not r.get("expected_ok", True)],
        "identity": summaries[0]["identity"],
        "shards": [str(s.get("shard") or d) for (d, _), s in zip(shards, summaries, strict=True)],
        "shard_dirs": [str(d) for d in dirs],
        "missing": missing,
        "duplicates": sorted(set(duplicates)),
        "matrix_cells": matrix_cells,
    }
    return results, summary


def cmd_merge(args: argparse.Namespace) -> int:
    out = Path(args.out)
    results, summary = merge(out, [Path(d) for d in args.dirs])
    paths = write_matrix_outputs(out, results, summary)
    print(f"merged {len(args.dirs)} shards: {summary['cells']} cells, {summary['verdicts']}")
    for key in ("missing", "duplicates"):
        if summary[key]:
            print(f"  {key}: {', '.join(summary[key])}")
    unexpected = [c for c in summary["unexpected"] if c not in summary["missing"]]
    for cell_id in unexpected:
        print(f"  unexpected: {cell_id}")
    print(f"report: {paths['index']}  junit: {paths['junit']}")
    broken = summary["missing"] or summary["duplicates"] or unexpected or summary["verdicts"].get("error")
    return 1 if broken else 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("report", help="matrix reports: merge the outputs of shards into one")
    sub = parser.add_subparsers(dest="report_command", required=True)
    merge_parser = sub.add_parser(
        "merge", help="merge shard dirs into one results.json, index.html and junit.xml (refuses mixed runs)"
    )
    merge_parser.add_argument("out", metavar="OUT", help="the merged report's dir")
    merge_parser.add_argument("dirs", metavar="DIR", nargs="+", help="the shards' `testbench matrix --out` dirs")
    merge_parser.set_defaults(func=cmd_merge)
