"""Shards: every cell in exactly one shard, the same split whatever the order of the cells, balanced by the
stored durations, and the front end's listing and one-line errors."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from testbench.datafiles import data_path
from testbench.errors import UserError
from testbench.matrix import load_matrix
from testbench.shard import (
    ShardSpec,
    load_durations,
    parse_shard,
    select,
    split,
    static_estimate,
    store_durations,
)


@dataclass(frozen=True)
class FakeCell:
    id: str
    initrd: str = "1M"

    def to_dict(self) -> dict:
        return {"id": self.id, "initrd": self.initrd}


CI_MATRIX = data_path("matrix-ci.toml")


def test_parse_shard():
    assert parse_shard("2/3") == ShardSpec(2, 3) and parse_shard(" 1 / 1 ").name == "1/1"
    for bad in ("0/3", "4/3", "3", "a/b", "", "1/0"):
        with pytest.raises(UserError):
            parse_shard(bad)


def test_longest_first_onto_the_least_loaded_shard():
    # By hand: 8 -> A; 7 -> B; 6 -> B (7 < 8): B = 13; 5 -> A: A = 13; 4 -> A (tie, lower shard): A = 17.
    cells = [FakeCell(name) for name in "abcde"]
    durations = dict(zip("abcde", (8.0, 7.0, 6.0, 5.0, 4.0), strict=True))
    shards = split(cells, 2, durations)
    assert [[c.id for c in part] for part in shards] == [["a", "d", "e"], ["b", "c"]]


def test_every_cell_once_and_the_same_split_in_any_order():
    cells = load_matrix()  # the default matrix, 54 cells
    durations = {cell.id: float(i % 7 + 1) for i, cell in enumerate(cells)}
    shards = split(cells, 4, durations)
    ids = [c.id for part in shards for c in part]
    assert sorted(ids) == sorted(c.id for c in cells) and len(ids) == len(set(ids))
    shuffled = cells[:]
    random.Random(5).shuffle(shuffled)
    again = split(shuffled, 4, durations)
    assert [{c.id for c in part} for part in again] == [{c.id for c in part} for part in shards]
    loads = [sum(durations[c.id] for c in part) for part in shards]
    assert max(loads) - min(loads) <= max(durations.values())  # within one cell of each other
    assert [c.id for c in select(cells, ShardSpec(3, 4), durations)] == [c.id for c in shards[2]]


def test_more_shards_than_cells_leaves_some_empty():
    shards = split([FakeCell("a"), FakeCell("b")], 3, {})
    assert sorted(len(part) for part in shards) == [0, 1, 1]


def test_stored_durations_beat_the_estimate():
    cells = [FakeCell("small", "1M"), FakeCell("big", "100M"), FakeCell("odd", "1M")]
    assert static_estimate("100M") > static_estimate("32M") > static_estimate("1M")
    by_estimate = split(cells, 2, {})
    assert [c.id for c in by_estimate[0]] == ["big"]
    by_durations = split(cells, 2, {"small": 30.0, "big": 1.0, "odd": 1.0})
    assert [c.id for c in by_durations[0]] == ["small"]


def test_durations_round_trip_in_toml_and_json(tmp_path):
    for name in ("durations.toml", "durations.json"):
        path = tmp_path / name
        store_durations({"x-1M": 4.24, 'we"ird': 1.0}, path)
        store_durations({"y-100M": 12.0}, path)  # folds into what is there
        assert load_durations(path) == {"x-1M": 4.2, 'we"ird': 1.0, "y-100M": 12.0}
    assert load_durations(tmp_path / "absent.toml") == {}
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(UserError):
        load_durations(tmp_path / "broken.json")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "testbench.cli", *args], capture_output=True, text=True)


def test_list_json_is_one_line_with_every_cell_in_a_shard():
    done = _cli("matrix", "--config", str(CI_MATRIX), "--list", "--json", "--shards", "3")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 1
    data = json.loads(done.stdout)
    names = [s["shard"] for s in data["shards"]]
    assert names == ["1/3", "2/3", "3/3"]
    cells = {c["id"]: c["shard"] for c in data["cells"]}
    assert len(cells) == 12 and set(cells.values()) == set(names)
    for shard in data["shards"]:
        assert all(cells[cell_id] == shard["shard"] for cell_id in shard["cells"])


def test_bad_shard_is_one_line_and_exit_2():
    done = _cli("matrix", "--config", str(CI_MATRIX), "--shard", "5/3", "--list")
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_the_pytest_plugin_collects_the_same_shard():
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests/matrix"]
        + ["--tb-matrix", str(CI_MATRIX), "--tb-shard", "2/3"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 0, done.stdout + done.stderr
    collected = [line.split("[", 1)[1].rstrip("]") for line in done.stdout.splitlines() if "::test_cell[" in line]
    assert collected == [c.id for c in select(load_matrix(CI_MATRIX), ShardSpec(2, 3), load_durations())]
