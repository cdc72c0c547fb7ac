"""The pure parts of testbench/observe/: diffs of two dumps, the pattern window, halt detection, post-mortem text.

Inputs are hand-made byte strings with the changed offsets chosen here, and kexec logs from the seed
excerpts (DOMAIN 4, log B), so every expected value is written out by hand, not taken from the code."""

from __future__ import annotations

from dataclasses import replace

import pytest
from zimage_builder import build_zimage

from testbench.inputs.kexeclog import parse_kexec_log
from testbench.inputs.zimage import parse_zimage
from testbench.observe.evidence import KEEP_WHOLE, PATTERN, diff_ranges, keep_evidence, load_fidelity, segment_changes
from testbench.observe.plan import Plan, SegmentSpec, free_window, make_plan
from testbench.observe.postmortem import (
    Hang,
    Output,
    halted_for_good,
    hang_reasons,
    is_branch_to_self,
    kernel_log_lines,
    locate_in,
    output_progress,
    pattern_writes,
    string_at,
    string_before,
)
from testbench.oracle import Prediction, Region


def _changed(size: int, offsets: list[int], seed: int = 7) -> tuple[bytes, bytes]:
    """`size` pseudo-random bytes and a copy with every byte in `offsets` inverted (so it surely differs)."""
    old = bytes((i * 131 + seed * 17 + (i >> 8)) & 0xFF for i in range(size))
    new = bytearray(old)
    for o in offsets:
        new[o] ^= 0xFF
    return old, bytes(new)


# --- diff_ranges -------------------------------------------------------------------------------------------
def test_identical_dumps_have_no_clobbered_range():
    old, _ = _changed(4096, [])
    assert diff_ranges(old, old) == []


def test_one_changed_run_is_one_half_open_range():
    old, new = _changed(4096, list(range(100, 116)))
    assert diff_ranges(old, new) == [(100, 116)]


def test_runs_closer_than_the_coalesce_distance_merge_and_far_ones_do_not():
    # Runs at [10, 12) and [40, 41): gap 28 < 64, one range. [500, 503): gap 459, a second range.
    old, new = _changed(1024, [10, 11, 40, 500, 501, 502])
    assert diff_ranges(old, new, coalesce=64) == [(10, 41), (500, 503)]
    # With a coalesce distance of 8 the first two stay apart.
    assert diff_ranges(old, new, coalesce=8) == [(10, 12), (40, 41), (500, 503)]


def test_changes_at_the_very_first_and_last_byte():
    old, new = _changed(300, [0, 299])
    assert diff_ranges(old, new, coalesce=1) == [(0, 1), (299, 300)]


def test_a_byte_rewritten_with_its_own_value_splits_nothing_within_the_coalesce_distance():
    # The decompressor overwrote [0, 200) but byte 50 happened to get its old value: still one range.
    old, new = _changed(400, [o for o in range(200) if o != 50])
    assert diff_ranges(old, new) == [(0, 200)]


def test_dumps_of_different_length_compare_the_common_prefix():
    old, new = _changed(256, [255])
    assert diff_ranges(old, new[:200]) == []


# --- free_window and the pattern window --------------------------------------------------------------------
def test_free_window_cuts_the_taken_ranges_out():
    taken = [(0x300, 0x400), (0x100, 0x180), (0x900, 0xA00)]  # unsorted, one past the end
    assert free_window(0x0, 0x800, taken) == [(0x0, 0x100), (0x180, 0x300), (0x400, 0x800)]


def test_free_window_with_overlapping_and_covering_ranges():
    assert free_window(0x100, 0x200, [(0x0, 0x150), (0x140, 0x160)]) == [(0x160, 0x200)]
    assert free_window(0x100, 0x200, [(0x0, 0x1000)]) == []
    assert free_window(0x100, 0x200, []) == [(0x100, 0x200)]


def test_pattern_writes_finds_what_changed_in_the_filled_gaps_only():
    # Window [0x1000, 0x3000); a segment occupies [0x1800, 0x2000), so the gaps are the rest.
    start = 0x1000
    window = bytearray(PATTERN * (0x2000 // 4))
    window[0x800:0x1000] = bytes(0x800)  # the segment: not pattern, but not a gap either
    window[0x10:0x20] = b"\x11" * 0x10  # a write at 0x1010..0x1020
    window[0x1F00:0x1F04] = b"\x22" * 4  # a write at 0x2F00..0x2F04
    gaps = [(0x1000, 0x1800), (0x2000, 0x3000)]
    assert pattern_writes(bytes(window), start, gaps, coalesce=64) == [(0x1010, 0x1020), (0x2F00, 0x2F04)]


def test_make_plan_from_seed_log_b(seed_text):
    """Log B (DOMAIN 4): RAM 0x10000000-0x4fffffff, Kernel 0x10008000, Initrd 0x11510000 size 0x53f46a,
    DT 0x11a50000 size 0xb044, zImage 0x7273a8 bytes (bufsz 0x7273ac: kexec adds 4 zero bytes)."""
    log = parse_kexec_log(seed_text("seed_b"))
    zimage = parse_zimage(build_zimage(z=0x7273A8, text_offset=0x208000))
    prediction = Prediction(
        "collision",
        regions=(
            Region("ram", 0x10000000, 0x50000000, "ram"),
            Region("kernel", 0x10208000, 0x11000000, "written"),
            Region("decompressor.malloc", 0x11B00000, 0x11B10000, "written"),
        ),
        collisions=(),
        assumptions=(),
    )
    plan = make_plan(log, zimage, (0x10000000, 0x50000000), prediction, {}, "console=ttyAMA0")
    assert plan.entry == 0x10008000
    assert plan.kernel_entry == 0x10000000 + 0x208000
    assert plan.dtb == 0x11A50000
    assert [(s.role, s.start, s.size) for s in plan.segments] == [
        ("kernel", 0x10008000, 0x7273A8),
        ("initrd", 0x11510000, 0x53F46A),
        ("dtb", 0x11A50000, 0xB044),
    ]
    # The pattern window: from the zImage end rounded up to a page, to 1 MiB past the footprint's top.
    assert plan.fill == (0x10730000, 0x11B10000 + (1 << 20))
    assert plan.regions == (("kernel", 0x10208000, 0x11000000), ("decompressor.malloc", 0x11B00000, 0x11B10000))
    gaps = free_window(*plan.fill, [(s.start, s.start + s.size) for s in plan.segments])
    assert gaps == [(0x10730000, 0x11510000), (0x11A4F46A, 0x11A50000), (0x11A5B044, 0x11C10000)]


# --- halt detection ----------------------------------------------------------------------------------------
ARM_B_SELF = bytes((0xFE, 0xFF, 0xFF, 0xEA))  # 0xeafffffe: B with offset -8, i.e. to itself (ARM ARM A8.8.18)
THUMB_B_SELF = bytes((0xFE, 0xE7))  # 0xe7fe: T2 encoding of B, offset -4


def test_branch_to_self_in_arm_and_thumb_state():
    assert is_branch_to_self(ARM_B_SELF, thumb=False)
    assert is_branch_to_self(THUMB_B_SELF + b"\0\0", thumb=True)
    assert not is_branch_to_self(bytes((0xFD, 0xFF, 0xFF, 0xEA)), thumb=False)  # b .-4
    assert not is_branch_to_self(ARM_B_SELF, thumb=True)
    assert not is_branch_to_self(bytes((0x00, 0xF0, 0x20, 0xE3)), thumb=False)  # nop


@pytest.mark.parametrize(
    ("cpsr", "final"),
    [
        (0x600001D3, True),  # SVC, I and F masked: what the decompressor runs with
        (0x60000153, False),  # F masked, I open: an IRQ handler could still change the return address
        (0x60000093, False),  # I masked, F open
        (None, False),  # CPSR unreadable: no proof
    ],
)
def test_a_halt_is_final_only_with_irq_and_fiq_masked(cpsr, final):
    assert halted_for_good(ARM_B_SELF, cpsr) is final


def test_thumb_state_comes_from_the_cpsr_t_bit():
    assert halted_for_good(THUMB_B_SELF + b"\0\0", 0x600001F3)  # T set
    assert not halted_for_good(THUMB_B_SELF + b"\0\0", 0x600001D3)  # T clear: read as ARM, not a b .


# --- strings behind registers ------------------------------------------------------------------------------
def test_string_at_and_string_before():
    rodata = b"\0\0 -- System halted\0XZ-compressed data is corrupt\0\0\0Bug in the XZ\0"
    past_corrupt = rodata.index(b"corrupt") + len(b"corrupt") + 1  # one past the NUL, as a print loop leaves it
    assert string_before(rodata[:past_corrupt]) == "XZ-compressed data is corrupt"
    assert string_at(rodata[past_corrupt:]) is None  # padding, not a string
    at_bug = rodata.index(b"Bug")
    assert string_at(rodata[at_bug:]) == "Bug in the XZ"
    assert string_before(rodata[:at_bug]) is None  # at_bug - 1 is NUL but at_bug - 2 is too: empty string
    assert string_at(b"short\0") is None and string_at(b"no terminator at all") is None
    assert string_before(b"\x01\x02binary\x7f\x80junk\0") is None  # only 4 printable characters


def test_locate_in_wants_exactly_one_occurrence():
    assert locate_in(b"abcXYZdef", b"XYZ") == 3
    assert locate_in(b"XYZabcXYZ", b"XYZ") is None
    assert locate_in(b"abc", b"XYZ") is None


# --- how far the output got, and the post-mortem text ------------------------------------------------------
REGIONS = (
    ("pagetables", 0x40204000, 0x40208000),
    ("kernel", 0x40208000, 0x415A90B4),
    ("decompressor.copy", 0x415A9900, 0x41ADAA60),
)


def test_output_progress_is_the_highest_write_inside_the_kernel_region():
    writes = [(0x40204000, 0x4053A200), (0x4053B000, 0x40A83579), (0x415A9900, 0x41AE3250)]
    got = output_progress(REGIONS, writes)
    assert got == Output(start=0x40208000, size=0x13A10B4, end=0x40A83579)
    untouched = output_progress(REGIONS, [(0x415A9900, 0x41AE3250)])
    assert untouched is not None and untouched.end is None
    assert output_progress(REGIONS[2:], writes) is None


def _plan() -> Plan:
    return Plan(
        entry=0x40008000,
        kernel_entry=0x40208000,
        text_offset=0x208000,
        dtb=0x42200000,
        segments=(),
        fill=None,
        regions=REGIONS,
        ram=(0x40000000, 0x80000000),
    )


def test_hang_reasons_for_a_halted_decompressor():
    hang = Hang(
        phase="decompress",
        deadline=90.0,
        waited=2.0,
        pc=0x415AA324,
        insn="eafffffe",
        halted_for_good=True,
        found_by="halt check",
        where=("decompressor.copy",),
        zimage_offset=0x1AC4,
        strings={
            "r0": {"past": "XZ-compressed data is corrupt"},
            "r3": {"past": "-- System halted", "at": "Attempting division by 0!"},
        },
        output=Output(start=0x40208000, size=0x13A10B4, end=0x40208000 + 0x13A10B4 // 4),
    )
    reasons = hang_reasons(hang, _plan())
    assert reasons[0].startswith("the kernel entry 0x40208000 never came within the decompress deadline (90 s)")
    assert "branch-to-self at 0x415aa324" in reasons[0] and "never will" in reasons[0]
    assert reasons[1] == "PC 0x415aa324 lies in decompressor.copy = zImage file offset 0x1ac4"
    # r3 is at one string and past another: a base pointer, ambiguous; only r0 is quoted.
    assert [r for r in reasons if "message" in r or "string" in r] == [
        "r0 points just past the message 'XZ-compressed data is corrupt' (as a print loop leaves its pointer)"
    ]
    assert reasons[-1].endswith("(25%)")


def test_hang_reasons_at_the_deadline_without_a_halt():
    hang = Hang(
        phase="decompress",
        deadline=9.0,
        waited=9.0,
        pc=0x41000000,
        insn="e3a00000",
        halted_for_good=False,
        found_by="deadline",
        where=(),
        zimage_offset=None,
        strings={},
    )
    reasons = hang_reasons(hang, _plan())
    assert reasons[0] == (
        "the kernel entry 0x40208000 never came within the decompress deadline (9 s); "
        "halted after 9.0 s at PC 0x41000000 (instruction e3a00000)"
    )
    assert len(reasons) == 1
    at_loop = replace(hang, insn="eafffffe", halted_for_good=True)
    assert hang_reasons(at_loop, _plan())[0].endswith(
        "(instruction eafffffe), a branch-to-self with IRQ and FIQ masked: it never would have"
    )


def test_hang_reasons_when_the_vm_could_not_be_examined():
    hang = Hang(phase="handoff", deadline=30.0, waited=30.0, found_by="deadline", error="post-mortem incomplete: boom")
    assert hang_reasons(hang, _plan()) == [
        "the zImage entry 0x40008000 never came within the handoff deadline (30 s); post-mortem incomplete: boom"
    ]


# --- kernel log lines in a RAM dump ------------------------------------------------------------------------
def test_log_records_are_quoted_and_printk_formats_and_efi_strings_are_not():
    ram = (
        b"\x00\x01Booting Linux Kernel...\x00"  # the EFI stub's plain string inside the zImage copy
        b"\x00Kernel panic - not syncing: %s\n\x00"  # a printk format in .rodata: '%' before its NUL
        b"\x00\x10\x00\x00Error: invalid dtb and unrecognized/unsupported machine ID\x00\x00"  # a record
        b"\x00Booting Linux on physical CPU 0x0\x00\x00"
    )
    assert kernel_log_lines(ram) == (
        "Error: invalid dtb and unrecognized/unsupported machine ID",
        "Booting Linux on physical CPU 0x0",
    )


# --- keep_evidence: which dumps stay in the case dir ---------------------------------------------------------


def _dumped(out, tag: str, seg: SegmentSpec, data: bytes) -> None:
    (out / f"{tag}-{seg.role}-{seg.start:08x}.bin").write_bytes(data)


def test_dumps_equal_to_their_file_or_to_stop1_are_dropped_and_listed(tmp_path):
    image = bytes(range(256)) * 64
    (tmp_path / "initrd.img").write_bytes(image)
    seg = SegmentSpec("initrd", 0x41000000, len(image), tmp_path / "initrd.img")
    _dumped(tmp_path, "stop1", seg, image)
    _dumped(tmp_path, "stop2", seg, image)
    problems, as_loaded = load_fidelity({seg: image})
    assert problems == [] and as_loaded == {seg}
    listing = keep_evidence(tmp_path, {seg: image}, segment_changes({seg: image}, {seg: image}), as_loaded)
    assert not list(tmp_path.glob("stop*.bin"))
    assert listing[0]["stop1"].startswith("not kept: equal to") and str(tmp_path / "initrd.img") in listing[0]["stop1"]
    assert listing[0]["stop2"] == "not kept: equal to stop 1"


def test_a_small_changed_segment_is_kept_whole_and_a_bad_load_keeps_stop1(tmp_path):
    image, loaded = _changed(4096, [10])  # stop 1 already differs from the file: load-fidelity evidence
    (tmp_path / "initrd.img").write_bytes(image)
    seg = SegmentSpec("initrd", 0x41000000, 4096, tmp_path / "initrd.img")
    _, later = _changed(4096, [10, 2000])
    _dumped(tmp_path, "stop1", seg, loaded)
    _dumped(tmp_path, "stop2", seg, later)
    problems, as_loaded = load_fidelity({seg: loaded})
    assert as_loaded == set()
    assert problems == ["initrd segment differs from initrd.img at load: first at +0xa, 1 ranges"]
    listing = keep_evidence(tmp_path, {seg: later}, segment_changes({seg: loaded}, {seg: later}), as_loaded)
    assert listing[0]["stop1"] == "stop1-initrd-41000000.bin"
    assert listing[0]["stop2"] == "stop2-initrd-41000000.bin"
    assert (tmp_path / "stop2-initrd-41000000.bin").read_bytes() == later


def test_a_big_clobbered_segment_keeps_only_its_changed_ranges(tmp_path):
    size = KEEP_WHOLE + 4096
    image = bytes(size)
    clobbered = bytearray(image)
    clobbered[0:0x100] = b"\xaa" * 0x100  # the decompressor's copy over the start of the initrd
    clobbered[0x5000:0x5004] = b"\x01\x02\x03\x04"
    (tmp_path / "initrd.img").write_bytes(image)
    seg = SegmentSpec("initrd", 0x418ED000, size, tmp_path / "initrd.img")
    _dumped(tmp_path, "stop1", seg, image)
    _dumped(tmp_path, "stop2", seg, bytes(clobbered))
    _, as_loaded = load_fidelity({seg: image})
    listing = keep_evidence(
        tmp_path, {seg: bytes(clobbered)}, segment_changes({seg: image}, {seg: bytes(clobbered)}), as_loaded
    )
    assert listing[0]["stop2"] == [
        "stop2-initrd-418ed000-changed-418ed000-418ed100.bin",
        "stop2-initrd-418ed000-changed-418f2000-418f2004.bin",
    ]
    assert (tmp_path / listing[0]["stop2"][0]).read_bytes() == b"\xaa" * 0x100
    assert (tmp_path / listing[0]["stop2"][1]).read_bytes() == b"\x01\x02\x03\x04"
    assert sorted(p.name for p in tmp_path.glob("stop*.bin")) == sorted(listing[0]["stop2"])


# --- the JSON edge: result.json's `observed` keeps its keys ------------------------------------------------
def test_observation_to_dict_has_the_result_json_keys():
    from testbench.observe.observation import Clobber, Footprint, Observation, StopReport
    from testbench.observe.postmortem import Written

    stops = (
        StopReport("zimage", 0x40008000, True, 0.5, 0x40008000, 0x42200000, 0xC50078, True),
        StopReport("kernel", 0x40208000, False, None),
    )
    hang = Hang(
        "decompress",
        30.0,
        2.0,
        "halt check",
        pc=0x415AA324,
        cpsr=0x600001D3,
        registers=tuple(range(16)),
        insn="eafffffe",
        halted_for_good=True,
        written=(Written(0x41000000, 0x41001000, ("kernel",)),),
        output=Output(0x40208000, 0x13A10B4, None),
        where=("decompressor.copy",),
        zimage_offset=0x1AC4,
        strings={"r0": {"past": "XZ-compressed data is corrupt"}},
        reasons=("the kernel entry never came",),
    )
    hung = Observation(
        "decompress",
        stops,
        (),
        (),
        (Clobber("kernel", 0x40008000, 0x40008100, 0, 0x100),),
        kernel_log=("Booting Linux on physical CPU 0x0",),
        dumps="/x/observe",
        hang=hang,
    )
    d = hung.to_dict()
    assert list(d) == [
        "phase",
        "stops",
        "fidelity",
        "clobbered",
        "by_design",
        "footprint",
        "kernel_log",
        "dumps",
        "hang",
    ]
    assert d["by_design"] == [
        {
            "segment": "kernel",
            "start": 0x40008000,
            "end": 0x40008100,
            "offset": 0,
            "end_offset": 0x100,
            "label": "kernel [0x40008000, 0x40008100) = +0x0..+0x100",
        }
    ]
    assert d["stops"][0] == {
        "name": "zimage",
        "expected_pc": 0x40008000,
        "reached": True,
        "seconds": 0.5,
        "pc": 0x40008000,
        "r2": 0x42200000,
        "sctlr": 0xC50078,
        "mmu_off": True,
        "problems": (),
    }
    assert d["footprint"] == {}
    assert d["hang"] == {
        "phase": "decompress",
        "deadline": 30.0,
        "waited": 2.0,
        "found_by": "halt check",
        "pc": 0x415AA324,
        "cpsr": 0x600001D3,
        "registers": list(range(16)),
        "insn": "eafffffe",
        "halted_for_good": True,
        "written": [{"start": 0x41000000, "end": 0x41001000, "regions": ["kernel"]}],
        "output_start": 0x40208000,
        "output_size": 0x13A10B4,
        "output_end": None,
        "where": ["decompressor.copy"],
        "zimage_offset": 0x1AC4,
        "strings": {"r0": {"past": "XZ-compressed data is corrupt"}},
        "reasons": ["the kernel entry never came"],
    }
    # Both stops came: a footprint and no post-mortem; a VM that could not be examined: the error alone.
    clean = Observation("kernel", stops, (), (), (), Footprint(0x41AE0000, (0x41000000, 0x42000000), False))
    assert clean.to_dict()["footprint"] == {
        "highest_written_end": 0x41AE0000,
        "window": [0x41000000, 0x42000000],
        "reached_window_top": False,
    }
    assert clean.to_dict()["hang"] == {}
    lost = Hang("handoff", 30.0, 30.0, "deadline", error="post-mortem incomplete: boom", reasons=("r",))
    assert lost.to_dict() == {
        "phase": "handoff",
        "deadline": 30.0,
        "waited": 30.0,
        "found_by": "deadline",
        "error": "post-mortem incomplete: boom",
        "reasons": ["r"],
    }
