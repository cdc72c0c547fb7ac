"""Shards: a deterministic, cost-balanced part of a matrix's cells, for a CI system to fan out.

A cell's cost is its wall seconds in the stored durations file (images/durations.toml, rewritten by
`testbench matrix --store-durations`; any `durations.json` a matrix run or a merge wrote can stand in for it),
else a static estimate by initrd size. The split is longest-processing-time first: cells by falling cost
(ties by cell id), each onto the shard with the least cost so far (ties by shard number). The same cells and
the same durations file give the same split on every runner, whatever the order of the matrix file.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .datafiles import data_path
from .errors import UserError
from .fileio import write_atomic
from .sizes import parse_size

DURATIONS = data_path("durations.toml")
# Without a stored duration: seconds for a cell with a tiny initrd, plus seconds per MiB of initrd (the load
# over 9p, both dumps and the unpacking). Fitted to images/durations.toml as measured here: only the ratios
# between cells matter to the split.
STATIC_BASE = 5.5
STATIC_PER_MIB = 0.07


@dataclass(frozen=True)
class ShardSpec:
    index: int  # 1-based, as CI systems number their jobs
    total: int

    @property
    def name(self) -> str:
        return f"{self.index}/{self.total}"


def parse_shard(text: str) -> ShardSpec:
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if match is None:
        raise UserError(f"--shard {text!r}: give K/N, e.g. 2/3 (shard K of N, counted from 1)")
    index, total = int(match.group(1)), int(match.group(2))
    if not 1 <= index <= total:
        raise UserError(f"--shard {text}: K must be between 1 and N")
    return ShardSpec(index, total)


def load_durations(path: Path | None = None) -> dict[str, float]:
    """Cell id -> seconds. A missing file is no durations (the static estimate applies); a broken one is an
    error, since a silently different split would break the shards' agreement."""
    path = Path(path) if path else DURATIONS
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    try:
        raw = json.loads(text) if path.suffix == ".json" else tomllib.loads(text).get("seconds", {})
    except (ValueError, tomllib.TOMLDecodeError) as err:
        raise UserError(f"durations file {path}: {err}") from None
    if not isinstance(raw, dict) or not all(isinstance(v, int | float) for v in raw.values()):
        raise UserError(f"durations file {path}: expected cell ids mapped to seconds")
    return {str(k): float(v) for k, v in raw.items()}


def store_durations(new: dict[str, float], path: Path | None = None) -> Path:
    """Fold `new` into the stored durations file (other cells keep their seconds)."""
    path = Path(path) if path else DURATIONS
    merged = load_durations(path) | {k: round(v, 1) for k, v in new.items()}
    if path.suffix == ".json":
        write_atomic(path, (json.dumps(dict(sorted(merged.items())), indent=1) + "\n").encode())
        return path
    lines = [
        "# Wall seconds per matrix cell, the cost `testbench matrix --shard` balances (see testbench/shard.py).",
        "# Rewritten by `testbench matrix --store-durations`; cells not listed get a static estimate.",
        "[seconds]",
        *(f"{json.dumps(cell_id)} = {seconds}" for cell_id, seconds in sorted(merged.items())),
    ]
    write_atomic(path, ("\n".join(lines) + "\n").encode())
    return path


def static_estimate(initrd: str) -> float:
    try:
        mib = parse_size(initrd) / (1 << 20)
    except UserError:
        mib = 0.0
    return STATIC_BASE + STATIC_PER_MIB * mib


@dataclass(frozen=True)
class Costed:
    cell_id: str
    seconds: float
    source: str  # "durations" | "estimate"


def costs(cells: Iterable, durations: dict[str, float]) -> dict[str, Costed]:
    """Cell id -> cost, for cells with `id` and `initrd` attributes (matrix.Cell)."""
    out = {}
    for cell in cells:
        if cell.id in durations:
            out[cell.id] = Costed(cell.id, durations[cell.id], "durations")
        else:
            out[cell.id] = Costed(cell.id, static_estimate(cell.initrd), "estimate")
    return out


def split(cells: list, total: int, durations: dict[str, float]) -> list[list]:
    """`total` shards (some empty when there are fewer cells), each in the matrix's own cell order."""
    if total < 1:
        raise UserError("a matrix splits into at least 1 shard")
    cost = costs(cells, durations)
    loads = [0.0] * total
    owner: dict[str, int] = {}
    for cell in sorted(cells, key=lambda c: (-cost[c.id].seconds, c.id)):
        target = min(range(total), key=lambda i: (loads[i], i))
        owner[cell.id] = target
        loads[target] += cost[cell.id].seconds
    shards: list[list] = [[] for _ in range(total)]
    for cell in cells:
        shards[owner[cell.id]].append(cell)
    return shards


def select(cells: list, spec: ShardSpec, durations: dict[str, float]) -> list:
    return split(cells, spec.total, durations)[spec.index - 1]


def listing(cells: list, total: int, durations: dict[str, float]) -> dict:
    """`testbench matrix --list --json`: every cell with its cost and shard, and the shards."""
    cost = costs(cells, durations)
    shards = split(cells, total, durations)
    where = {cell.id: ShardSpec(i + 1, total).name for i, part in enumerate(shards) for cell in part}
    return {
        "cells": [
            cell.to_dict()
            | {"cost_s": round(cost[cell.id].seconds, 1), "cost_from": cost[cell.id].source}
            | {"shard": where[cell.id]}
            for cell in cells
        ],
        "shards": [
            {
                "shard": ShardSpec(i + 1, total).name,
                "cells": [cell.id for cell in part],
                "cost_s": round(sum(cost[cell.id].seconds for cell in part), 1),
            }
            for i, part in enumerate(shards)
        ],
    }
