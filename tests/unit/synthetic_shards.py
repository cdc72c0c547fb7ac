"""Shard dirs as `testbench matrix --shard K/N` leaves them, made without QEMU: the CI matrix's cells split
by the real shard code, each with a made-up verdict (the tests state it, the code under test never sees it
beforehand), a clobbered range, and the artifact files the report links."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

from testbench.datafiles import data_path
from testbench.matrix import RunMode, identity, load_matrix
from testbench.report.outputs import verdict_counts, write_matrix_outputs
from testbench.shard import ShardSpec, split

CI_MATRIX = data_path("matrix-ci.toml")
ARTIFACTS = ("console.log", "layout.svg", "repro.sh", "result.json")
SVG = '<svg xmlns="http://www.w3.org/2000/svg" width="40" height="20"><rect width="40" height="20" fill="#9c9"/></svg>'


def made_up_verdict(cell) -> str:
    """What the synthetic run 'saw': default placement fails, except one 32M cell that errs."""
    if cell.machine == "vexpress-a9" and cell.initrd == "32M" and cell.placement == "advised":
        return "error"
    return "fail" if cell.placement == "default" else "pass"


def clobber_label(cell) -> str:
    return f"dtb [0x{0x41000000 + len(cell.id):x}, 0x41001000) = +0x0..+0x1000"


def result_for(cell, shard: str | None) -> dict:
    verdict = made_up_verdict(cell)
    observed = {"clobbered": [{"segment": "dtb", "label": clobber_label(cell)}]} if verdict == "fail" else {}
    return {
        "cell": cell.to_dict(),
        "verdict": verdict,
        "phase": "kernel" if verdict == "fail" else "init",
        "reasons": [f"made up for {cell.id}"],
        "observed": observed,
        "wall_seconds": 3.0 + len(cell.id) % 5,
        "expected_ok": cell.expect is None or verdict == cell.expect,
        "shard": shard,
    }


def make_shards(root: Path, total: int = 3, ident_overrides: dict | None = None) -> list[Path]:
    cells = load_matrix(CI_MATRIX)
    ident = identity(CI_MATRIX, {}, RunMode()) | (ident_overrides or {})
    dirs = []
    for index, part in enumerate(split(cells, total, {}), start=1):
        name = ShardSpec(index, total).name
        out = root / f"shard-{index}"
        out.mkdir(parents=True)
        results = [result_for(cell, name) for cell in part]
        for result in results:
            cell_dir = out / result["cell"]["id"]
            cell_dir.mkdir()
            (cell_dir / "console.log").write_text(f"console of {result['cell']['id']}\n")
            (cell_dir / "layout.svg").write_text(SVG)
            (cell_dir / "repro.sh").write_text("#!/bin/sh\n")
            (cell_dir / "result.json").write_text("{}\n")
        summary = {
            "cells": len(results),
            "wall_seconds": 10.0 * index,
            "jobs": 2,
            "mode": RunMode().to_dict(),
            "verdicts": verdict_counts(results),
            "unexpected": [r["cell"]["id"] for r in results if not r["expected_ok"]],
            "identity": ident,
            "shard": name,
            "matrix_cells": [cell.to_dict() for cell in cells],
            "shard_cells": [cell.id for cell in part],
        }
        write_matrix_outputs(out, results, summary)
        dirs.append(out)
    return dirs


class GridCells(HTMLParser):
    """The grid's cells: data-cell -> (attributes, links inside)."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: dict[str, dict] = {}
        self.current: str | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "td" and "data-cell" in a:
            self.current = a["data-cell"]
            self.cells[self.current] = {"attrs": a, "links": []}
        elif tag == "a" and self.current is not None:
            self.cells[self.current]["links"].append(a.get("href"))

    def handle_endtag(self, tag):
        if tag == "td":
            self.current = None
