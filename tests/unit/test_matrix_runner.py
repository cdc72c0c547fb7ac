"""The matrix runner without QEMU: a cell process forked from the preloaded server runs in the caller's
environment and directory as they are when the cell starts, its output lands in the cell's runner.log, and
a cell that never wrote result.json comes back as an `error` quoting that log; cells start one per stage-1
profile first, then longest first."""

from __future__ import annotations

import os

from testbench.matrix import RUNNER_LOG, Cell, CellRunner, profile_order, run_cell


def test_a_failed_cell_is_an_error_quoting_its_runner_log(tmp_path):
    runner = CellRunner()
    result = run_cell(Cell("nosuch", "1G", "1M", "default"), tmp_path / "a", runner=runner)
    assert result["verdict"] == "error" and "unknown machine 'nosuch'" in result["reasons"][0]
    assert "unknown machine" in (tmp_path / "a" / RUNNER_LOG).read_text()
    assert result["cell"]["id"] == "nosuch-1G-debian-initrd1M-default" and result["expected_ok"]


def test_the_cell_sees_the_environment_of_now_not_of_the_servers_start(tmp_path, monkeypatch):
    runner = CellRunner()
    run_cell(Cell("nosuch", "1G", "1M", "default"), tmp_path / "first", runner=runner)  # the server runs now
    monkeypatch.setenv("TESTBENCH_LOCK", str(tmp_path / "absent-lock.toml"))
    monkeypatch.chdir(tmp_path)
    result = run_cell(Cell("virt", "1G", "1M", "default"), tmp_path / "second", runner=runner)
    assert result["verdict"] == "error" and "absent-lock.toml" in result["reasons"][0], result["reasons"]
    assert os.environ["TESTBENCH_LOCK"].endswith("absent-lock.toml")


def test_profiles_first_then_longest_first():
    cells = [
        Cell("virt", "1G", "1M", "default"),
        Cell("virt", "1G", "100M", "default"),
        Cell("virt", "512M", "1M", "default"),
        Cell("virt", "512M", "32M", "advised"),
        Cell("vexpress-a9", "1G", "1M", "default"),
    ]
    cost = {"1M": 4.0, "32M": 7.0, "100M": 12.0}
    order = [c.id for c in profile_order(cells, lambda c: cost[c.initrd] + (0.5 if c.placement == "advised" else 0))]
    # By hand: each profile's dearest cell first (12, 7.5, 4 for vexpress-a9), then the rest (4, 4) in matrix order.
    assert order == [
        "virt-1G-debian-initrd100M-default",
        "virt-512M-debian-initrd32M-imagesize",
        "vexpress-a9-1G-debian-initrd1M-default",
        "virt-1G-debian-initrd1M-default",
        "virt-512M-debian-initrd1M-default",
    ]
    # Without costs: round-robin over the profiles, in the matrix's order.
    assert [c.id for c in profile_order(cells)][:3] == [cells[0].id, cells[2].id, cells[4].id]
