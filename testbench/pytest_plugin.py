"""pytest plugin (entry point pytest11): one test per matrix cell, with JUnit provenance.

A test that takes the `tb_cell` argument is parametrised over the matrix (`--tb-matrix`, narrowed by the
axis options); the `tb_result` fixture runs that cell in its own `testbench run` process and returns its
result.json. Every cell records its inputs (names, versions, sha256), QEMU version, verdict and phase as
JUnit properties, and a failing cell names its artifact dir. Cells run in separate processes with their
own dirs and unix sockets, so `pytest -n auto` is safe. `--tb-shard K/N` keeps the cells of one shard, the
same split as `testbench matrix --shard K/N` (shard.py): one mechanism for both.
"""

import os
from pathlib import Path

import pytest

from .datafiles import data_path
from .matrix import Cell, RunMode, load_matrix, run_cell
from .shard import load_durations, parse_shard, select
from .verdict import UNTIL

AXIS_OPTIONS = {
    "machine": "--tb-machine",
    "ram": "--tb-ram",
    "initrd": "--tb-initrd-size",
    "placement": "--tb-placement",
    "kernel": "--tb-kernel",
    "kexec": "--tb-kexec",
    "memmap": "--tb-memmap",
    "smp": "--tb-smp",
}
CI_MATRIX = data_path("matrix-ci.toml")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("testbench", "testbench kexec matrix")
    group.addoption("--tb-matrix", help="matrix TOML for tb_cell tests (default images/matrix-ci.toml)")
    group.addoption("--tb-out", help="keep every cell's artifacts under this dir (default: pytest's tmp dir)")
    for axis, option in AXIS_OPTIONS.items():
        group.addoption(option, action="append", help=f"only these {axis} values (repeatable)")
    group.addoption(
        "--tb-until",
        choices=UNTIL,
        help="kernel-entry: layout verdicts only, no stage-2 boot (default init)",
    )
    group.addoption("--tb-no-observe", action="store_true", help="no gdbstub stops and segment diffs")
    group.addoption("--tb-no-snapshot", action="store_true", help="boot stage 1 in every cell")
    group.addoption("--tb-full-hash", action="store_true", help="stage 2 hashes every payload in full")
    group.addoption(
        "--tb-shard",
        metavar="K/N",
        help="only shard K of N of the cells: the split `testbench matrix --shard` makes (shard.py)",
    )
    group.addoption(
        "--tb-durations", metavar="FILE", help="durations the shards balance (default images/durations.toml)"
    )
    group.addoption(
        "--tb-kexec-args",
        action="append",
        help='a placement given as literal kexec arguments, e.g. "--image-size=0x2000000" (repeatable)',
    )


def _cells(config: pytest.Config) -> list[Cell]:
    only = {axis: config.getoption(option) for axis, option in AXIS_OPTIONS.items()}
    if config.getoption("--tb-kexec-args"):
        only["placement"] = (only.get("placement") or []) + config.getoption("--tb-kexec-args")
    path = config.getoption("--tb-matrix")
    cells = load_matrix(Path(path) if path else CI_MATRIX, only)
    shard = config.getoption("--tb-shard")
    if shard:
        durations = config.getoption("--tb-durations")
        cells = select(cells, parse_shard(shard), load_durations(Path(durations) if durations else None))
    return cells


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "tb_cell" in metafunc.fixturenames:
        cells = _cells(metafunc.config)
        metafunc.parametrize("tb_cell", cells, ids=[cell.id for cell in cells])


@pytest.fixture
def tb_result(tb_cell: Cell, request: pytest.FixtureRequest, tmp_path: Path, record_property) -> dict:
    base = request.config.getoption("--tb-out")
    out = Path(base) / tb_cell.id if base else tmp_path / tb_cell.id
    request.node.tb_artifacts = out
    config = request.config
    mode = RunMode.from_flags(
        config.getoption("--tb-no-observe"),
        config.getoption("--tb-until"),
        config.getoption("--tb-no-snapshot"),
        config.getoption("--tb-full-hash"),
    )
    result = run_cell(tb_cell, out, mode)
    inputs = dict(result.get("inputs") or {})
    debian = inputs.pop("debian", None) or {}
    record_property("debian_suite", debian.get("suite"))
    record_property("debian_lock_sha256", debian.get("lock_sha256"))
    if debian.get("drift"):
        record_property("debian_drift", "; ".join(f"{d['name']} {d['locked']} -> {d['now']}" for d in debian["drift"]))
    for role, item in inputs.items():
        record_property(
            f"input.{role}",
            f"{os.path.basename(item['path'])} {item.get('version') or ''} sha256:{item['sha256']}".replace("  ", " "),
        )
    record_property("loader_version", result.get("loader_version"))
    record_property("qemu_version", result.get("qemu_version"))
    record_property("verdict", result["verdict"])
    record_property("phase", result.get("phase"))
    record_property("oracle_agrees", result.get("oracle_agrees"))
    record_property("stage1", (result.get("stage1") or {}).get("from"))
    record_property("expected", tb_cell.expect)
    record_property("artifacts", str(out))
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    artifacts = getattr(item, "tb_artifacts", None)
    if artifacts is not None and report.failed:
        report.sections.append(("testbench artifacts", f"cell artifacts: {artifacts}"))
    return report
