"""The lock against the real archive (issue 12.3): a locked version Debian has dropped is one clear line and
exit 2 with nothing half-written in the cache; with drift allowed the archive's set is taken and the drift is
recorded where every result reads it.

The stale lock is the real lock with its kernel put back to linux-image-6.1.0-50-armmp 6.1.176-1, the build
bookworm served before its point release replaced it (DOMAIN.md 9.1): a version the archive no longer has.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from cache_mirror import manifest_file, mirror_cache

from testbench.inputs.images import Images, load_images
from testbench.inputs.lock import LockedPackage, read_lock, render

GONE_KERNEL = LockedPackage("linux-image-6.1.0-50-armmp", "6.1.176-1", "0" * 64, 43_000_000)


def _stale_lock(tmp_path: Path) -> Path:
    real = read_lock()
    suite = real.suite("bookworm")
    packages = tuple(GONE_KERNEL if p.name == suite.kernel else p for p in suite.packages)
    stale = replace(suite, kernel=GONE_KERNEL.name, packages=packages)
    path = tmp_path / "lock.toml"
    path.write_text(render(real.default_suite, (stale,)))
    return path


def _fetch(cache: Path, lock: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "testbench.cli", "images", "fetch"],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, TESTBENCH_CACHE=str(cache), TESTBENCH_LOCK=str(lock), **env),
    )


def _image_files(cache: Path) -> list[str]:
    """Everything the fetch could have half-written: packages, trees, manifests (apt's own lists aside)."""
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if "apt" not in p.relative_to(cache).parts)


def test_a_version_gone_from_the_archive_is_one_line_and_nothing_written(tmp_path: Path, images: Images) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    done = _fetch(cache, _stale_lock(tmp_path))
    assert done.returncode == 2, done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if not line.startswith("[testbench]")]
    assert len(errors) == 1, done.stderr
    assert "locked linux-image-6.1.0-50-armmp 6.1.176-1 is no longer in the archive" in errors[0]
    assert f"now has {images.kernel_package} " in errors[0], errors[0]
    assert "testbench images lock --suite bookworm" in errors[0] and "TESTBENCH_ALLOW_DRIFT=1" in errors[0]
    assert "Traceback" not in done.stderr
    assert _image_files(cache) in ([], [".lock"]), _image_files(cache)


def test_allowed_drift_takes_the_archive_and_records_it(
    tmp_path: Path, images: Images, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A mirror of the real cache already holds the archive's current set: nothing big is downloaded.
    cache = tmp_path / "cache"
    mirror_cache(images.root, cache)
    lock = _stale_lock(tmp_path)
    done = _fetch(cache, lock, TESTBENCH_ALLOW_DRIFT="1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"DRIFT linux-image-6.1.0-50-armmp -> {images.kernel_package}: locked 6.1.176-1" in done.stderr
    manifest = json.loads(manifest_file(cache).read_text())
    assert manifest["drift"] == [
        {
            "name": f"linux-image-6.1.0-50-armmp -> {images.kernel_package}",
            "locked": "6.1.176-1",
            "now": images.package(images.kernel_package).version,
        }
    ]
    monkeypatch.setenv("TESTBENCH_CACHE", str(cache))
    monkeypatch.setenv("TESTBENCH_LOCK", str(lock))
    drifted = load_images()
    assert drifted.zimage == images.zimage.resolve() or drifted.zimage.resolve() == images.zimage.resolve()
    assert drifted.provenance()["drift"] == manifest["drift"]
    # The real lock in force again: the drifted cache is refused, not used silently.
    monkeypatch.delenv("TESTBENCH_LOCK")
    with pytest.raises(Exception, match="fetched from another lock"):
        load_images()
