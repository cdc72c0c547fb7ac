"""Fixtures for the real QEMU integration tests: they boot Debian's armhf kernel under TCG."""

import shutil
from pathlib import Path

import pytest

from testbench.case import CaseRequest, CaseResult, prepare_case, run_case
from testbench.inputs.images import Images, load_images
from testbench.machines import get_machine


def pytest_collection_modifyitems(items):
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.qemu)


@pytest.fixture(scope="session")
def images() -> Images:
    if shutil.which("qemu-system-arm") is None:
        pytest.skip("qemu-system-arm is not installed: run scripts/setup")
    # A missing cache is a setup bug, not an absent capability: let load_images() fail loudly.
    return load_images()


@pytest.fixture
def run_kexec_case(images: Images, tmp_path: Path):
    def run(machine: str, ram: str | None = None, case: str = "case", **options) -> CaseResult:
        m = get_machine(machine)
        ram_bytes = m.default_ram if ram is None else int(ram)
        request = CaseRequest(machine=m, ram=ram_bytes, out=tmp_path / case, **options)
        return run_case(prepare_case(request, images))

    return run
