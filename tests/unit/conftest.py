"""Fixtures for the zImage / kexec log / oracle tests: seed logs, the Debian zImage(s), synthetic zImages."""

from __future__ import annotations

from pathlib import Path

import pytest
from debian_kernel import default_kernel_tree, find_kernel_trees
from zimage_builder import DATA, build_zimage

NO_KERNEL = (
    "no Debian armmp zImage cached: set TESTBENCH_DEBIAN_ZIMAGE, or run `testbench images fetch` "
    "(it unpacks linux-image-*-armmp into $TESTBENCH_CACHE/tree/<sha256>/)"
)


@pytest.fixture
def seed_text():
    """Seed log excerpts, copied verbatim from /work/shared/seeds/001 (quote prefixes and all)."""
    return lambda name: (DATA / f"{name}.txt").read_text()


def _debian_zimage() -> Path | None:
    tree = default_kernel_tree()
    return tree.zimage if tree is not None else None


@pytest.fixture(scope="session")
def debian_zimage() -> Path:
    """The default Debian kernel: the one the cache's bookworm manifest names, else the newest cached."""
    path = _debian_zimage()
    if path is None or not path.is_file():
        pytest.skip(NO_KERNEL)
    return path


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # `kernel_tree`: one test per armmp kernel in the cache (several suites may sit side by side), each
    # with the config and System.map of its own package.
    if "kernel_tree" in metafunc.fixturenames:
        params = [pytest.param(t, id=t.release) for t in find_kernel_trees()] or [
            pytest.param(None, id="no-kernel", marks=pytest.mark.skip(reason=NO_KERNEL))
        ]
        metafunc.parametrize("kernel_tree", params)


@pytest.fixture
def make_zimage():
    return build_zimage
