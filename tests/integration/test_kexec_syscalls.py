"""kexec-tools' syscall switches on 32-bit ARM, with Debian's kexec-tools 2.0.25 in a real guest.

No ARM32 kernel offers kexec_file_load (no CONFIG_KEXEC_FILE; syscall 401 is only reserved), and kexec-tools
leaves the syscall undefined on arm. So `-s` (file load only) must fail at load time with kexec's own
message, while `-c` (kexec_load only) and `-a` (file load first, then kexec_load) must load, and `-a` must
place the kernel, initrd and DTB exactly where `-c` and the plain command do (DOMAIN.md 3.3).
"""

import pytest

# A roomy kernel size so the loads also boot stage 2: the second kernel proves the -c/-a loads were real.
ROOMY = "--image-size=0x2000000"
FILE_LOAD_MISSING = "syscall kexec_file_load not available"


@pytest.fixture(scope="module")
def plain(images, tmp_path_factory):
    """The reference: the same load with no syscall switch (2.0.25 then uses kexec_load)."""
    from testbench.case import CaseRequest, prepare_case, run_case
    from testbench.machines import get_machine

    m = get_machine("virt")
    request = CaseRequest(
        machine=m, ram=m.default_ram, out=tmp_path_factory.mktemp("plain") / "case", kexec_args=(ROOMY,)
    )
    return run_case(prepare_case(request, images))


def placement(result) -> dict:
    """What kexec decided: where each image goes and how much room it gets, plus every segment."""
    load = result.load
    assert load is not None, result.verdict
    return {
        "images": {role: (load[role]["address"], load[role]["size"]) for role in ("kernel", "initrd", "dtb")},
        "entry": load["entry"],
        "segments": [(s["mem"], s["memsz"]) for s in load["segments"]],
    }


def test_file_load_only_fails_at_load_with_kexecs_message(run_kexec_case):
    result = run_kexec_case("virt", kexec_args=("-s", ROOMY))
    assert result.verdict.verdict == "fail", result.verdict
    assert result.verdict.phase == "load", result.verdict
    # kexec-tools' main() returns EFALLBACK (-3) when the syscall is not built in for the arch: status 253.
    assert result.kexec_rc == 253
    assert any(FILE_LOAD_MISSING in reason for reason in result.verdict.reasons), result.verdict
    # Nothing was loaded, so there is no plan to parse and the second kernel never ran.
    assert result.load is None or not result.load.get("segments")
    assert result.stage2 is None
    debug = (result.request.out / "kexec-debug.txt").read_text()
    assert FILE_LOAD_MISSING in debug


@pytest.mark.parametrize("switch", ["-c", "-a"])
def test_kexec_load_and_auto_load_place_like_the_plain_command(run_kexec_case, plain, switch):
    assert plain.verdict.verdict == "pass", plain.verdict
    result = run_kexec_case("virt", kexec_args=(switch, ROOMY))
    assert result.kexec_rc == 0, result.verdict
    assert result.verdict.verdict == "pass", result.verdict
    assert placement(result) == placement(plain)
    # kexec-tools' fixed rule, independently of the plain run: the zImage goes 0x8000 above the RAM base.
    assert result.load["kernel"]["address"] == result.request.machine.ram_base + 0x8000
