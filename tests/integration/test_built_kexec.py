"""scripts/build-kexec's static kexec, built from Debian's kexec-tools source package, against Debian's own
binary of the same release: the same case must get the same verdict, phase, placement and version.

Skipped (with the command that fixes it) when the build is not in the cache, since building needs apt.
"""

import json

import pytest

from testbench.errors import UserError
from testbench.fileio import sha256_file
from testbench.inputs.checks import check_kexec
from testbench.inputs.images import built_dir, kexec_path

BUILT = "built:debian-src"
CASES = {"default": (), "roomy": ("--image-size=0x2000000",), "file-load-only": ("-s",)}


# Session scope, and first in every test's arguments: the skip must come before the `images` fixture,
# which fails loudly on a missing image cache.
@pytest.fixture(scope="session")
def built_kexec():
    try:
        path = kexec_path(BUILT)
    except UserError as err:
        pytest.skip(f"{err} (scripts/build-kexec builds it from Debian's kexec-tools source package)")
    return path


def outcome(result) -> dict:
    load = result.load or {}
    return {
        "verdict": result.verdict.verdict,
        "phase": result.verdict.phase,
        "kexec_rc": result.kexec_rc,
        "loader_version": result.loader_version,
        "placement": {
            role: (load[role]["address"], load[role]["size"]) for role in ("kernel", "initrd", "dtb") if role in load
        },
        "segments": [(s["mem"], s["memsz"]) for s in load.get("segments", [])],
    }


def test_the_build_is_a_static_arm_binary_described_by_its_meta(built_kexec):
    assert not check_kexec(built_kexec).dynamic
    meta = json.loads((built_dir("kexec", BUILT.removeprefix("built:")) / "meta.json").read_text())
    assert meta["source"]["kind"] == "debian-source" and meta["source"]["package"] == "kexec-tools"
    assert meta["sha256"] == sha256_file(built_kexec)


@pytest.mark.parametrize("case", CASES)
def test_built_and_debian_kexec_agree(built_kexec, run_kexec_case, images, tmp_path, case):
    from testbench.case import CaseRequest, prepare_case, run_case
    from testbench.machines import get_machine

    args = CASES[case]
    m = get_machine("virt")
    debian = run_case(
        prepare_case(CaseRequest(machine=m, ram=m.default_ram, out=tmp_path / "debian", kexec_args=args), images)
    )
    built = run_kexec_case("virt", kexec=built_kexec, kexec_args=args)
    assert built.verdict.verdict != "error", built.verdict
    assert outcome(built) == outcome(debian)
    # Both ran what they claim: Debian's package binary in one case, this build in the other.
    assert built.inputs["kexec"].sha256 != debian.inputs["kexec"].sha256
    assert built.inputs["kexec"].path == built_kexec
    # The guest's `kexec --version` of the build is recorded, and it is the release Debian packages.
    assert built.loader_version is not None
    assert images.package("kexec-tools").version.split(":")[-1].startswith(built.loader_version)
    if case == "file-load-only":  # kexec's own message and status, word for word
        assert built.verdict.reasons == debian.verdict.reasons
