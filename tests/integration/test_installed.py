"""An installed bench (`pip install .`, not editable) runs from any directory: every data file it needs
(machines, memory maps, matrices, the lock, the guest recipes) is package data found through one function
(testbench/datafiles.py), never a path relative to a checkout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from testbench.inputs.images import Images

CHECKOUT = Path(__file__).resolve().parents[2]
SEED_B = CHECKOUT / "tests" / "unit" / "data" / "seed_b.txt"


def _run(cmd: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    # A clean PYTHONPATH: the checkout must not leak into the installed bench.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def test_pip_install_runs_analyze_and_a_case_from_elsewhere(tmp_path: Path, images: Images) -> None:
    venv, elsewhere = tmp_path / "venv", tmp_path / "elsewhere"
    elsewhere.mkdir()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    installed = _run([str(venv / "bin" / "pip"), "install", "-q", str(CHECKOUT)], elsewhere, 600)
    assert installed.returncode == 0, installed.stderr[-2000:]
    where = _run([str(venv / "bin" / "python"), "-c", "import testbench; print(testbench.__file__)"], elsewhere, 60)
    assert where.stdout.startswith(str(venv)), where.stdout  # the installed copy, not the checkout
    testbench = str(venv / "bin" / "testbench")

    analyzed = _run([testbench, "analyze", str(SEED_B), "--text-offset", "0x208000"], elsewhere, 60)
    assert analyzed.returncode == 1 and "verdict: collision" in analyzed.stdout, analyzed.stdout + analyzed.stderr

    # A whole case: machines.toml, the lock and the stage-1/stage-2 recipes all come from the package.
    out = elsewhere / "case"
    ran = _run(
        [testbench, "run", "--machine", "virt", "--kexec-args=--image-size=0x2000000", "--out", str(out)],
        elsewhere,
        600,
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert ran.stdout.startswith("pass (phase init)"), ran.stdout

    # The default matrix file is there too (matrix --help names it; running 54 cells is another test's job).
    listed = _run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "from testbench.matrix import DEFAULT_MATRIX; print(DEFAULT_MATRIX.is_file(), DEFAULT_MATRIX)",
        ],
        elsewhere,
        60,
    )
    assert listed.stdout.startswith(f"True {venv}"), listed.stdout
