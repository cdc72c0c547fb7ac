"""`testbench report merge`: shards of one run become one results.json, index.html (a grid that names every
cell) and junit.xml; missing and duplicate cells are reported; shards of another matrix, lock file or
bench version are refused in one line with exit 2."""

from __future__ import annotations

import json
from xml.etree import ElementTree as ET

import pytest
from synthetic_shards import ARTIFACTS, CI_MATRIX, GridCells, clobber_label, made_up_verdict, make_shards

from testbench.cli import main
from testbench.matrix import load_matrix
from testbench.report.html import GRID_LINKS

CI_CELLS = load_matrix(CI_MATRIX)


def _grid(path) -> dict[str, dict]:
    parser = GridCells()
    parser.feed(path.read_text())
    return parser.cells


def test_three_shards_merge_into_one_report(tmp_path, capsys):
    dirs = make_shards(tmp_path)
    out = tmp_path / "merged"
    code = main(["report", "merge", str(out), *map(str, dirs)])
    printed = capsys.readouterr().out
    assert code == 1, printed  # the made-up error cell: an error is never a clean run
    data = json.loads((out / "results.json").read_text())
    assert [r["cell"]["id"] for r in data["results"]] == [c.id for c in CI_CELLS]  # the matrix's order
    assert {r["cell"]["id"]: r["verdict"] for r in data["results"]} == {c.id: made_up_verdict(c) for c in CI_CELLS}
    summary = data["summary"]
    assert summary["missing"] == [] and summary["duplicates"] == [] and summary["shards"] == ["1/3", "2/3", "3/3"]
    assert summary["wall_seconds"] == 30.0  # side by side: the slowest shard
    for cell in CI_CELLS:
        for name in ARTIFACTS:
            assert (out / cell.id / name).is_file(), (cell.id, name)

    grid = _grid(out / "index.html")
    assert set(grid) == {c.id for c in CI_CELLS}
    for cell in CI_CELLS:
        found = grid[cell.id]
        assert found["attrs"]["data-verdict"] == made_up_verdict(cell)
        assert set(found["links"]) >= {f"{cell.id}/{name}" for name, _ in GRID_LINKS}
        if made_up_verdict(cell) == "fail":
            assert clobber_label(cell) in found["attrs"]["title"]

    suite = ET.parse(out / "junit.xml").getroot()
    cases = {case.get("name"): case for case in suite.iter("testcase")}
    assert set(cases) == {c.id for c in CI_CELLS} and suite.get("tests") == "12"
    errored = [c.id for c in CI_CELLS if made_up_verdict(c) == "error"]
    assert [name for name, case in cases.items() if case.find("error") is not None] == errored
    assert suite.get("failures") == "0" and suite.get("errors") == "1"
    assert json.loads((out / "durations.json").read_text()).keys() == {
        c.id for c in CI_CELLS if made_up_verdict(c) != "error"
    }


def test_a_missing_shard_and_a_repeated_one_are_reported(tmp_path, capsys):
    dirs = make_shards(tmp_path)
    out = tmp_path / "merged"
    assert main(["report", "merge", str(out), str(dirs[0]), str(dirs[1]), str(dirs[1])]) == 1
    printed = capsys.readouterr().out
    data = json.loads((out / "results.json").read_text())
    lost = json.loads((dirs[2] / "results.json").read_text())["summary"]["shard_cells"]
    assert data["summary"]["missing"] == [c.id for c in CI_CELLS if c.id in lost]
    repeated = json.loads((dirs[1] / "results.json").read_text())["summary"]["shard_cells"]
    assert data["summary"]["duplicates"] == sorted(repeated)
    assert "missing: " in printed and "duplicates: " in printed
    grid = _grid(out / "index.html")
    assert {cell_id for cell_id, found in grid.items() if found["attrs"]["data-verdict"] == "missing"} == set(lost)
    suite = ET.parse(out / "junit.xml").getroot()
    errored = [c.id for c in CI_CELLS if made_up_verdict(c) == "error" and c.id not in lost]
    assert suite.get("tests") == "12" and int(suite.get("errors")) == len(lost) + len(errored)


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ({"matrix": {"path": "images/matrix.toml", "sha256": "0" * 64}}, "another matrix file"),
        ({"lock_sha256": "1" * 64}, "another lock file"),
        ({"bench_version": "0.0.9+abc"}, "another bench version"),
        ({"mode": {"observe": False, "until": "init", "snapshot": True, "full_hash": False}}, "another run mode"),
    ],
)
def test_shards_of_another_run_are_refused_in_one_line(tmp_path, capsys, override, words):
    good = make_shards(tmp_path / "a")
    other = make_shards(tmp_path / "b", ident_overrides=override)
    out = tmp_path / "merged"
    assert main(["report", "merge", str(out), str(good[0]), str(other[1]), str(good[2])]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err and str(other[1]) in err
    assert not (out / "results.json").exists()


def test_bad_dirs_are_one_line_errors(tmp_path, capsys):
    dirs = make_shards(tmp_path)
    assert main(["report", "merge", str(dirs[0]), *map(str, dirs)]) == 2  # OUT is a shard dir
    assert main(["report", "merge", str(tmp_path / "m"), str(tmp_path / "nothing")]) == 2
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "results.json").write_text("[1, 2]")
    assert main(["report", "merge", str(tmp_path / "m"), str(tmp_path / "junk")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 3 and "Traceback" not in err
