"""`testbench doctor` (issue 7.7): exit 0 on this (set-up) machine; with something broken, exit 1 and the
failing line names the command that fixes it. Breakage is made by the environment (PATH, TESTBENCH_CACHE)
or in a private copy of the cache, never by touching the real cache."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from cache_mirror import mirror_cache

from testbench.inputs.images import Images
from testbench.machines import all_machines


def _doctor(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "testbench.cli", "doctor", "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=dict(os.environ, **env),
        timeout=120,
    )


def _failures(done: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in done.stdout.splitlines() if line.startswith("FAIL")]


def test_healthy_machine(tmp_path: Path, images: Images) -> None:
    done = _doctor(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert _failures(done) == []
    assert re.search(r"qemu-system-arm \d+\.\d+", done.stdout), done.stdout
    assert "every .deb matches its sha256" in done.stdout
    # Each board started with exactly the bench's devices (a missing ROM would have failed here).
    boards = len(all_machines())  # one line per board of machines.toml
    assert done.stdout.count("the board starts with -nodefaults") == boards, done.stdout


def test_empty_cache_names_images_fetch(tmp_path: Path, images: Images) -> None:
    empty = tmp_path / "empty-cache"
    empty.mkdir()
    done = _doctor(tmp_path, TESTBENCH_CACHE=str(empty))
    assert done.returncode == 1, done.stdout
    failures = _failures(done)
    assert len(failures) == 1 and "testbench images fetch" in failures[0], done.stdout


def test_missing_qemu_names_apt_get(tmp_path: Path, images: Images) -> None:
    # Every other tool doctor looks for stays reachable, so the only failure is QEMU's.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("dpkg-deb", "apt-get", "dtc", "fdtget", "depmod"):
        found = shutil.which(tool)
        assert found, f"{tool} is part of the set-up machine"
        (bindir / tool).symlink_to(found)
    done = _doctor(tmp_path, PATH=str(bindir))
    assert done.returncode == 1, done.stdout
    failures = _failures(done)
    assert len(failures) == 1, done.stdout
    assert "qemu-system-arm" in failures[0] and "apt-get install qemu-system-arm" in failures[0]


def test_corrupt_deb_is_named(tmp_path: Path, images: Images) -> None:
    fake = tmp_path / "cache"
    manifest = mirror_cache(images.root, fake)
    victim = fake / "debs" / manifest["packages"][0]["deb"]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.unlink()
    victim.write_bytes(bytes(data))
    done = _doctor(tmp_path, TESTBENCH_CACHE=str(fake))
    assert done.returncode == 1, done.stdout
    failures = _failures(done)
    assert len(failures) == 1, done.stdout
    assert victim.name in failures[0] and "sha256" in failures[0] and "testbench images fetch" in failures[0]
