"""Ground truth from the emulator (run --observe): stops at zImage and kernel entry, segment diffs, oracle.

Expected values come from DOMAIN.md and the facts table, not from this code: the Debian armmp zImage has
TEXT_OFFSET 0x208000 (8.1); on virt with a 32 MB initrd kexec's default placement loses the initrd from +0 to
an end that belongs to the build (tests/unit/kernel_facts.toml, keyed by the zImage's sha256: 0x1f6250 for
6.1.0-50, DOMAIN 8.3); --image-size=0x2000000 fixes every machine (8.3)."""

import json
from pathlib import Path

from debian_kernel import facts_for

# A byte the decompressor writes with the value it already had is invisible; the last written bytes can
# coincide with the payload by chance, so the observed end may fall short by a few bytes, never exceed.
END_SLACK = 64
TEXT_OFFSET = 0x208000  # DOMAIN 8.1


def _stops(result):
    return {s["name"]: s for s in result.observed["stops"]}


def test_virt_32m_default_initrd_clobbered_from_offset_zero(run_kexec_case):
    result = run_kexec_case("virt", initrd_size=32 << 20, observe=True)
    base = result.request.machine.ram_base
    stops = _stops(result)
    assert stops["zimage"]["pc"] == base + 0x8000 and stops["kernel"]["pc"] == base + TEXT_OFFSET
    assert all(s["mmu_off"] and not s["problems"] for s in stops.values()), stops
    assert stops["zimage"]["r2"] == result.load["dtb"]["address"]
    assert not result.observed["fidelity"]
    initrd = [c for c in result.observed["clobbered"] if c["segment"] == "initrd"]
    assert initrd[0]["offset"] == 0
    facts = facts_for(Path(result.inputs["kernel"].path)) or {}
    measured_end = facts.get("emulator", {}).get("virt_1g_32m_default_initrd_clobber_end")
    if measured_end is not None:  # a build of the facts table: its measured end, exactly (within END_SLACK)
        assert measured_end - END_SLACK <= initrd[-1]["end_offset"] <= measured_end
    else:  # another build: the clobber ends below the decompressor's footprint, which the oracle gives
        footprint_end = max(c["end"] for c in result.predicted["collisions"] if c["b"] == "initrd")
        assert result.load["initrd"]["address"] + initrd[-1]["end_offset"] <= footprint_end
    # The oracle, on the same inputs, predicted the same start (it is a collision at the initrd's start).
    assert result.oracle["agrees"], result.oracle
    fatal = [c for c in result.predicted["collisions"] if c["b"] == "initrd" and c["severity"] == "fatal"]
    assert min(c["start"] for c in fatal) == result.load["initrd"]["address"]
    fp = result.oracle["footprint"]
    assert fp["measured_end"] <= fp["predicted_end"]
    assert result.verdict.verdict == "fail"
    on_disk = json.loads((result.request.out / "result.json").read_text())
    assert on_disk["oracle_agrees"] is True and on_disk["observed"]["clobbered"]
    # The evidence kept on disk: the 32 MB initrd's stop-2 dump is its clobbered bytes alone (the stop-1
    # dump equalled the shared file), and the share holds a hard link to the cached initrd, not a copy.
    dumps = Path(result.observed["dumps"])
    listing = {d["segment"]: d for d in json.loads((dumps / "dumps.json").read_text())}
    assert listing["initrd"]["stop1"].startswith("not kept: equal to")
    first_piece = dumps / listing["initrd"]["stop2"][0]
    assert first_piece.read_bytes()[:4] != (result.request.out / "share" / "initrd.img").read_bytes()[:4]
    assert sum((dumps / name).stat().st_size for name in listing["initrd"]["stop2"]) < 4 << 20
    assert (result.request.out / "share" / "initrd.img").stat().st_nlink >= 2


def test_image_size_keeps_every_segment_intact(run_kexec_case):
    result = run_kexec_case("virt", initrd_size=32 << 20, kexec_args=("--image-size=0x2000000",), observe=True)
    assert result.observed["clobbered"] == [], result.observed["clobbered"]
    assert all(s["reached"] for s in result.observed["stops"])
    assert result.oracle["agrees"], result.oracle
    assert result.verdict.verdict == "pass", result.verdict


def test_vexpress_a9_small_initrd_dtb_clobbered_explains_silent_hang(run_kexec_case):
    result = run_kexec_case("vexpress-a9", observe=True)
    dtb = [c for c in result.observed["clobbered"] if c["segment"] == "dtb"]
    assert dtb and dtb[0]["start"] == result.load["dtb"]["address"], result.observed["clobbered"]
    assert _stops(result)["kernel"]["reached"]
    assert result.verdict.verdict == "fail" and result.verdict.phase == "kernel", result.verdict
    assert any("phase diagnosis" in r and "silent" in r for r in result.verdict.reasons), result.verdict
    assert result.oracle["agrees"], result.oracle
