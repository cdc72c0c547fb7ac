"""cpus.py and the SMP parts of verdict.judge_stage2: Linux CPU lists, the kexec_load EINVAL of a board that
cannot take a CPU offline, the CPUs stage 2 brought up against --smp, and SMP trouble after kexec -e.
Console excerpts are the lines Linux 6.1 prints (kernel/cpu.c, arch/arm/kernel/smp.c), written by hand."""

import pytest

from testbench.cpus import Cpus, cpu_count, load_refusal, stage2_cpu_problems
from testbench.verdict import judge_stage2, parse_stage2

CMDLINE = "console=ttyAMA0 panic=-1"
EINVAL = "kexec_load: entry = 0x80008000 flags = 0x280000\nkexec_load failed: Invalid argument\n"


@pytest.mark.parametrize(
    ("text", "count"), [("0", 1), ("0-3", 4), ("0,2-3", 3), ("0-1,4-7\n", 6), ("", None), ("x", None), (None, None)]
)
def test_cpu_count_reads_linux_cpu_lists(text, count):
    assert cpu_count(text) == count


def test_stage1_cpus_from_the_setup_line():
    assert Cpus.parse("possible 0-3 online 0-1\n") == Cpus("0-3", "0-1")
    assert Cpus.parse("") == Cpus(None, None)


def test_einval_with_several_cpus_possible_is_the_hotplug_refusal():
    (reason,) = load_refusal(EINVAL, Cpus("0-1", "0-1"), cpu_hotplug=False)
    assert reason.startswith("a CPU cannot be taken offline: 2 CPUs possible (0-1)")
    assert "nr_cpus=1" in reason and "cpu_kill" in reason
    # A board whose data says it can hotplug still gets the explanation, worded as what EINVAL means.
    (other,) = load_refusal(EINVAL, Cpus("0-3", "0"), cpu_hotplug=True)
    assert "4 CPUs possible" in other and "machines.toml" not in other


@pytest.mark.parametrize(
    ("debug", "cpus"),
    [
        (EINVAL, Cpus("0", "0")),  # one CPU: EINVAL has another cause
        (EINVAL, None),  # stage 1 never said
        ("kexec_load failed: Cannot allocate memory\n", Cpus("0-3", "0-3")),  # not EINVAL
    ],
)
def test_other_load_failures_are_not_blamed_on_cpus(debug, cpus):
    assert load_refusal(debug, cpus, cpu_hotplug=False) == ()


def _marker(online: str, possible: str) -> str:
    return (
        'TESTBENCH-STAGE2 {"cmdline": "console=ttyAMA0 panic=-1", "iomem_ram": ["40000000-7fffffff"], '
        '"fdt_sha256": "", "payload_sha256": "ab", "payload_size": 2, '
        f'"cpus_online": "{online}", "cpus_possible": "{possible}"}}\n'
    )


def test_stage2_reports_its_cpus():
    got = parse_stage2(_marker("0-3", "0-3"))
    assert got is not None and (got.cpus_online, got.cpus_possible) == ("0-3", "0-3")
    assert got.to_dict()["cpus_online"] == "0-3"


def test_stage2_must_have_every_cpu_of_the_case_online():
    assert judge_stage2(_marker("0-3", "0-3"), CMDLINE, "ab", "marker", expected_cpus=4).verdict == "pass"
    text = "[    1.1] CPU2: failed to come online\n" + _marker("0-1,3", "0-3")
    verdict = judge_stage2(text, CMDLINE, "ab", "marker", expected_cpus=4)
    assert (verdict.verdict, verdict.phase) == ("fail", "init")
    assert verdict.reasons[0].startswith("stage 2 brought up 3 CPU(s) (online 0-1,3, possible 0-3)")
    assert any("CPU2: failed to come online" in r for r in verdict.reasons)
    # Without an expectation (replay) the CPU count is not judged.
    assert judge_stage2(_marker("0", "0-3"), CMDLINE, "ab", "marker").verdict == "pass"


def test_stage2_problems_name_an_unreadable_cpu_list():
    assert stage2_cpu_problems(None, None, 2) == [
        "stage 2 brought up an unknown number of CPU(s) (online ?, possible ?); the case runs 2 (--smp)"
    ]


def test_a_handoff_that_stops_while_cpus_go_offline_says_so():
    text = "[   30.1] kexec_core: Starting new kernel\n[   30.2] Disabling non-boot CPUs ...\n"
    verdict = judge_stage2(text, CMDLINE, None, "silence", expected_cpus=2)
    assert (verdict.verdict, verdict.phase) == ("fail", "handoff")
    assert "taking the other CPUs offline" in verdict.reasons[0]
    # Once Bye! is out, the CPUs went offline: the silence is the new kernel's, as on one CPU.
    after = judge_stage2(text + "[   30.4] CPU1 killed.\n[   30.5] Bye!\n", CMDLINE, None, "silence", expected_cpus=2)
    assert after.phase == "handoff" and after.reasons[0].startswith("silence after Bye!")
