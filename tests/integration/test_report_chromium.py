"""The merged matrix report in a real browser: headless Chromium (Debian's `chromium`) opens index.html from
disk, and the DOM it built holds every cell of the grid with its verdict and its links, each link resolving
to a file beside the report. No QEMU: the shards are made up (tests/unit/synthetic_shards.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from synthetic_shards import CI_MATRIX, GridCells, made_up_verdict, make_shards

from testbench.cli import main
from testbench.matrix import load_matrix

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    BROWSER is None, reason="no headless browser: `apt-get install --no-install-recommends chromium`"
)


def _chromium(profile: Path, *args: str) -> subprocess.CompletedProcess:
    # --no-sandbox: Chromium's sandbox refuses to run as root, which CI and setup are
    flags = ["--headless", "--disable-gpu", "--hide-scrollbars", "--no-first-run", f"--user-data-dir={profile}"]
    flags += ["--no-sandbox"] if os.geteuid() == 0 else []
    assert BROWSER is not None
    return subprocess.run([BROWSER, *flags, *args], capture_output=True, text=True, timeout=120)


def test_chromium_finds_every_cell_of_the_merged_report(tmp_path: Path):
    out = tmp_path / "merged"
    main(["report", "merge", str(out), *map(str, make_shards(tmp_path))])
    page = (out / "index.html").resolve().as_uri()
    dom = _chromium(tmp_path / "profile", "--dump-dom", page)
    assert dom.returncode == 0, dom.stderr[-2000:]
    parser = GridCells()
    parser.feed(dom.stdout)
    cells = load_matrix(CI_MATRIX)
    assert set(parser.cells) == {c.id for c in cells}, dom.stdout[:2000]
    for cell in cells:
        found = parser.cells[cell.id]
        assert found["attrs"]["data-verdict"] == made_up_verdict(cell)
        for href in found["links"]:
            target = href.split("#")[0]
            assert not target or (out / target).is_file(), (cell.id, href)
    shot = tmp_path / "index.png"
    done = _chromium(tmp_path / "profile", f"--screenshot={shot}", "--window-size=1400,1000", page)
    assert done.returncode == 0 and shot.stat().st_size > 10_000, done.stderr[-2000:]
