"""verdict.compare_oracle and judge_observation on hand-made typed inputs, the objects the bench passes:
the oracle's `Prediction` (collisions a/b/start/end/severity, regions name/role/start/end) and the emulator's
`Observation` (clobbered segment/start/end/offset/end_offset, footprint, stops, post-mortem). Addresses are
those of DOMAIN 8.3 (virt, small initrd: the relocated decompressor copy runs over the initrd and the DTB
from their first byte)."""

from __future__ import annotations

from dataclasses import replace

from testbench.observe.observation import Clobber, Footprint, Observation, StopReport
from testbench.observe.postmortem import Hang
from testbench.oracle import Collision, Prediction, Region
from testbench.verdict import START_TOLERANCE, FootprintCheck, Verdict, compare_oracle, judge_observation

INITRD = 0x418ED000
DTB = 0x419C5000
COPY = (0x415A9900, 0x41ADAA60)  # decompressor.copy
MALLOC = (0x41ADBE78, 0x41AEBE78)


def _predicted(*collisions: tuple[str, str, int, int, str], footprint_end: int = MALLOC[1]) -> Prediction:
    return Prediction(
        "collision" if collisions else "safe",
        regions=(
            Region("ram", 0x40000000, 0x80000000, "ram"),
            Region("decompressor.copy", COPY[0], COPY[1], "written"),
            Region("decompressor.malloc", MALLOC[0], footprint_end, "written"),
        ),
        collisions=tuple(Collision(a, b, s, e, sev) for a, b, s, e, sev in collisions),
        assumptions=(),
    )


STOPS = (StopReport("zimage", 0x40008000, True, 0.6), StopReport("kernel", 0x40208000, True, 2.0))


def _observed(
    *clobbered: tuple[str, int, int], base: dict | None = None, measured_end: int | None = None
) -> Observation:
    base = base or {"initrd": INITRD, "dtb": DTB}
    return Observation(
        "kernel",
        STOPS,
        fidelity=(),
        clobbered=tuple(Clobber(seg, s, e, s - base[seg], e - base[seg]) for seg, s, e in clobbered),
        by_design=(),
        footprint=Footprint(measured_end, None, False),
    )


def test_agreement_when_the_clobber_starts_at_the_predicted_first_byte():
    predicted = _predicted(("decompressor.copy", "initrd", INITRD, COPY[1], "fatal"))
    observed = _observed(("initrd", INITRD, COPY[1] - 0x40), measured_end=MALLOC[0] + 0x100)
    got = compare_oracle(observed, predicted)
    assert got.agrees is True and got.differences == ()
    assert got.footprint == FootprintCheck(
        measured_end=MALLOC[0] + 0x100, predicted_end=MALLOC[1], unused_top=MALLOC[1] - MALLOC[0] - 0x100
    )


def test_a_few_unchanged_bytes_at_the_start_are_tolerated_more_are_not():
    predicted = _predicted(("decompressor.copy", "initrd", INITRD, COPY[1], "fatal"))
    near = _observed(("initrd", INITRD + START_TOLERANCE, INITRD + 0x1000))
    assert compare_oracle(near, predicted).agrees is True
    far = _observed(("initrd", INITRD + START_TOLERANCE + 4, INITRD + 0x1000))
    got = compare_oracle(far, predicted)
    assert got.agrees is False
    assert got.differences == (
        f"initrd: first clobbered byte {INITRD + START_TOLERANCE + 4:#x}, oracle's first {INITRD:#x}",
    )


def test_a_predicted_fatal_collision_the_emulator_did_not_see():
    predicted = _predicted(("decompressor.copy", "dtb", DTB, DTB + 0x100000, "fatal"))
    got = compare_oracle(_observed(), predicted)
    assert got.agrees is False
    assert "dtb: oracle predicts decompressor.copy x dtb" in got.differences[0]
    assert "intact" in got.differences[0]


def test_a_clobber_the_oracle_did_not_predict():
    got = compare_oracle(_observed(("dtb", DTB, DTB + 0x40)), _predicted())
    assert got.agrees is False
    assert got.differences == (
        f"dtb: emulator saw [{DTB:#x}, {DTB + 0x40:#x}) clobbered, the oracle predicts no collision",
    )


def test_clobbered_bytes_outside_every_predicted_range():
    predicted = _predicted(("decompressor.copy", "initrd", INITRD, INITRD + 0x1000, "fatal"))
    observed = _observed(("initrd", INITRD, INITRD + 0x800), ("initrd", INITRD + 0x2000, INITRD + 0x2100))
    got = compare_oracle(observed, predicted)
    assert got.differences == (
        f"initrd: clobbered [{INITRD + 0x2000:#x}, {INITRD + 0x2100:#x}) lies outside every predicted collision",
    )


def test_a_clobber_across_two_touching_predicted_regions_is_covered():
    # kernel.bss ends where decompressor.copy begins: one clobbered range across both is inside their union.
    predicted = _predicted(
        ("kernel.bss", "initrd", INITRD, INITRD + 0x800, "fatal"),
        ("decompressor.copy", "initrd", INITRD + 0x800, INITRD + 0x4000, "fatal"),
    )
    assert compare_oracle(_observed(("initrd", INITRD, INITRD + 0x3000)), predicted).agrees is True


def test_a_clobber_inside_a_benign_prediction_agrees():
    # Benign: the malloc arena overlaps the DTB but the decoder may not touch it. Touched or not, no conflict.
    predicted = _predicted(("decompressor.malloc", "dtb", DTB, DTB + 0x1000, "benign"))
    assert compare_oracle(_observed(("dtb", DTB + 0x10, DTB + 0x20)), predicted).agrees is True
    assert compare_oracle(_observed(), predicted).agrees is True


def test_writes_above_the_predicted_footprint_disagree():
    got = compare_oracle(_observed(measured_end=MALLOC[1] + 0x1000), _predicted())
    assert got.agrees is False
    assert got.differences == (
        f"decompressor wrote up to {MALLOC[1] + 0x1000:#x}, above the oracle's footprint end {MALLOC[1]:#x}",
    )


def test_no_prediction_or_an_undecided_oracle_never_agrees():
    assert compare_oracle(_observed(), None).agrees is False
    got = compare_oracle(_observed(), Prediction("unknown", (), (), ()))
    assert got.agrees is False and "unknown" in got.differences[0]


# --- judge_observation -------------------------------------------------------------------------------------
def test_a_clean_observation_keeps_a_passing_verdict():
    verdict = Verdict("pass", "init", ("stage-2 init reached",))
    observed = _observed()
    assert judge_observation(verdict, observed, compare_oracle(observed, _predicted())) == verdict


def test_a_clobber_turns_a_pass_into_a_fail():
    predicted = _predicted(("decompressor.copy", "initrd", INITRD, COPY[1], "fatal"))
    observed = _observed(("initrd", INITRD, INITRD + 0x100))
    got = judge_observation(Verdict("pass", "init"), observed, compare_oracle(observed, predicted))
    assert got.verdict == "fail"
    assert (
        f"clobbered between zImage entry and kernel entry: initrd [{INITRD:#x}, {INITRD + 0x100:#x}) = +0x0..+0x100"
    ) in got.reasons


def test_an_oracle_disagreement_alone_fails_the_test():
    observed = _observed()
    predicted = _predicted(("decompressor.copy", "dtb", DTB, DTB + 0x100, "fatal"))
    got = judge_observation(Verdict("pass", "init"), observed, compare_oracle(observed, predicted))
    assert got.verdict == "fail"
    assert any(r.startswith("oracle disagrees with the emulator: dtb:") for r in got.reasons)


def test_decompress_phase_takes_the_post_mortem_reasons():
    hang = Hang("decompress", 30.0, 30.0, "deadline", reasons=("the kernel entry never came", "r0 ..."))
    stops = (STOPS[0], StopReport("kernel", 0x40208000, False, None))
    observed = replace(_observed(), phase="decompress", stops=stops, footprint=None, hang=hang)
    got = judge_observation(Verdict("fail", "handoff", ("silence after Bye!",)), observed, None)
    assert got.verdict == "fail" and got.phase == "decompress"
    assert got.reasons[:2] == ("the kernel entry never came", "r0 ...")
    assert got.reasons[-1] == "silence after Bye!"
    # Without a post-mortem, the generic line.
    bare = replace(observed, hang=None)
    assert "never fired" in judge_observation(Verdict("fail", "handoff"), bare, None).reasons[0]
