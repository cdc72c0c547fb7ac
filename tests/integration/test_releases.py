"""Debian's real kernels and loaders from three releases, crossed (the CI subset of
images/matrix-releases.toml): bullseye's kexec-tools 2.0.20, bookworm's 2.0.25, trixie's 2.0.29; kernels
5.10, 6.1, 6.12, all with TEXT_OFFSET 0x208000. Needs `testbench images fetch --suite bullseye` and
`--suite trixie` (CI does both)."""

from __future__ import annotations

import pytest

from testbench.errors import UserError
from testbench.inputs.images import load_images, loader_version
from testbench.inputs.zimage import read_zimage
from testbench.machines import get_machine
from testbench.oracle import advise

MiB = 1 << 20


def _upstream(images) -> str:
    """kexec-tools' upstream version in a suite's lock ('1:2.0.20-2.1' -> '2.0.20'), what `--version` prints."""
    return images.package("kexec-tools").version.split(":")[-1].split("-")[0]


@pytest.fixture(scope="session")
def suites():
    try:
        return {s: load_images(s) for s in ("bullseye", "trixie")}
    except UserError as err:
        pytest.skip(f"{err}")


def test_trixie_kernel_under_bullseye_loader_fails_by_text_offset(suites, run_kexec_case):
    result = run_kexec_case("virt", kernel=suites["trixie"].zimage, kernel_suite="trixie", kexec_suite="bullseye")
    assert _upstream(suites["bullseye"]) == result.loader_version == "2.0.20"  # the clash's release range
    assert result.verdict.verdict == "fail" and result.verdict.phase == "kernel", result.verdict
    assert {c.segment for c in result.observation.clobbered} >= {"initrd", "dtb"}
    assert result.agreement is not None and result.agreement.agrees, result.agreement
    assert result.placement is not None and result.placement.agrees, result.placement
    # 2.0.20 got the command line in the DTB, not as --command-line (which it cannot take on ARM)
    assert "--command-line" not in (result.request.out / "share" / "autorun.sh").read_text()


def test_bullseye_kernel_under_trixie_loader_passes_with_the_advice(suites, run_kexec_case):
    zi = read_zimage(suites["bullseye"].zimage)
    m = get_machine("virt")
    advice = advise(
        zi, [(m.ram_base, m.ram_base + m.default_ram)], loader_version("debian:trixie"), 2 * MiB, m.dtb_size
    )
    assert advice.needed and advice.image_size
    result = run_kexec_case(
        "virt",
        kernel=suites["bullseye"].zimage,
        kernel_suite="bullseye",
        kexec_suite="trixie",
        kexec_args=(f"--image-size={advice.image_size:#x}",),
    )
    assert result.loader_version == _upstream(suites["trixie"])
    assert result.verdict.verdict == "pass", result.verdict
    assert result.agreement is not None and result.agreement.agrees
    # the case records the bullseye kernel it ran, as locked (not the default suite's)
    bullseye = suites["bullseye"]
    assert result.inputs["kernel"].version == bullseye.package(bullseye.kernel_package).version


def test_bullseye_loader_given_append_gets_the_option_clash_diagnosis(suites, run_kexec_case):
    result = run_kexec_case("vexpress-a9", kexec_suite="bullseye", kexec_args=("--append=quiet",))
    assert result.verdict.verdict == "fail" and result.verdict.phase == "load", result.verdict
    assert any("option-clash" in r and "2.0.21" in r for r in result.verdict.reasons), result.verdict.reasons
