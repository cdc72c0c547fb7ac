"""The CI fan-out simulated on one machine: the CI matrix file as 3 shards, in 3 separate processes with 3
separate output dirs (as 3 runners would), merged with `testbench report merge`; the merged verdicts and
phases must equal those of one single run of the same matrix, cell by cell."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from testbench.datafiles import data_path
from testbench.matrix import load_matrix

CI_MATRIX = data_path("matrix-ci.toml")


def _matrix(*args: str) -> list[str]:
    return [sys.executable, "-m", "testbench.cli", "matrix", "--config", str(CI_MATRIX), *args]


def _verdicts(out: Path) -> dict[str, tuple[str, str]]:
    data = json.loads((out / "results.json").read_text())
    return {r["cell"]["id"]: (r["verdict"], r["phase"]) for r in data["results"]}


def test_three_shards_merge_into_the_verdicts_of_a_single_run(tmp_path: Path, images):
    shard_dirs = [tmp_path / f"runner-{k}" / "out" for k in (1, 2, 3)]
    # Side by side, one cell at a time each: three small runners.
    shards = [
        subprocess.Popen(_matrix("--shard", f"{k}/3", "-n", "1", "--out", str(d)), stdout=subprocess.PIPE, text=True)
        for k, d in enumerate(shard_dirs, start=1)
    ]
    outputs = [shard.communicate(timeout=1800)[0] for shard in shards]
    for shard, output in zip(shards, outputs, strict=True):
        assert shard.returncode == 0, output
    parts = [json.loads((d / "results.json").read_text())["summary"]["shard_cells"] for d in shard_dirs]
    everything = [cell.id for cell in load_matrix(CI_MATRIX)]
    assert sorted(sum(parts, [])) == sorted(everything) and all(parts)  # disjoint, complete, none empty

    merged = tmp_path / "merged"
    done = subprocess.run(
        [sys.executable, "-m", "testbench.cli", "report", "merge", str(merged), *map(str, shard_dirs)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr

    single = tmp_path / "single"
    run = subprocess.run(_matrix("-n", "2", "--out", str(single)), capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]

    merged_verdicts, single_verdicts = _verdicts(merged), _verdicts(single)
    assert list(merged_verdicts) == everything
    assert merged_verdicts == single_verdicts
    for cell_id in everything:  # the merged report links each cell's own artifacts, copied from its shard
        assert (merged / cell_id / "result.json").is_file() and (merged / cell_id / "console.log").is_file()
