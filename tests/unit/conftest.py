"""Fixtures for the zImage / kexec log / oracle tests: seed logs, the Debian zImage, synthetic zImages."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import pytest
from zimage_builder import DATA, build_zimage


@pytest.fixture
def seed_text():
    """Seed log excerpts, copied verbatim from /work/shared/seeds/001 (quote prefixes and all)."""
    return lambda name: (DATA / f"{name}.txt").read_text()


def _debian_zimage() -> Path | None:
    env = os.environ.get("TESTBENCH_DEBIAN_ZIMAGE")
    if env:
        return Path(env)
    cache = Path(os.environ.get("TESTBENCH_CACHE", Path.home() / ".cache" / "testbench"))
    for pattern in ("/tmp/debs/k/boot/vmlinuz-*-armmp", str(cache / "**" / "boot" / "vmlinuz-*-armmp")):
        found = sorted(glob.glob(pattern, recursive=True))
        if found:
            return Path(found[-1])
    return None


@pytest.fixture(scope="session")
def debian_zimage() -> Path:
    path = _debian_zimage()
    if path is None or not path.is_file():
        pytest.skip("Debian armmp zImage absent: set TESTBENCH_DEBIAN_ZIMAGE or unpack "
                    "linux-image-6.1.0-*-armmp into $TESTBENCH_CACHE (testbench images fetch)")
    return path


@pytest.fixture
def make_zimage():
    return build_zimage
