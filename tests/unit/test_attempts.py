"""A pasted report read as attempts: the two seed threads pasted whole, and logs cut and glued from them.

Inputs are the seed threads copied verbatim into data/ (thread_2016_debug_rodata.txt is /work/shared/seeds/000,
the 2016 DEBUG_RODATA thread flattened onto one line with inline "> " markers; thread_2020_a80.txt is seeds/001,
the 2020 "Trying to kexec on Allwinner A80" thread). Expected numbers are the ones printed in the thread,
Russell King's reading of them, or DOMAIN.md sections 2.4, 4 and 9.2; never this code's output.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from testbench.cli import main
from testbench.errors import UserError
from testbench.inputs.attempts import split_attempts
from testbench.inputs.kexeclog import KexecLogError, parse_kexec_log
from testbench.machines import get_machine
from testbench.oracle.judge import Inputs, judge
from testbench.replay_cli import _addresses, pick_attempt

# RMK: "located (correctly) at 0x200080C0-0x2044BAC0, and it has decided to relocate itself to
# 0x20B80B00-0x20FC4500"
A80_COPY = (0x200080C0, 0x2044BAC0, 0x20B80B00, 0x20FC4500)


@pytest.fixture
def a80(seed_text):
    return seed_text("thread_2020_a80")


def _lines(text: str, first: int, last: int) -> str:
    """Paste lines first..last (1-based, inclusive) of a seed, as a user would cut them."""
    return "".join(text.splitlines(keepends=True)[first - 1 : last])


def _parts(a80: str) -> dict[str, str]:
    return {
        "first": _lines(a80, 1, 80),  # Corentin's first attempt (2.0.18) through its Bye!
        "failed": _lines(a80, 81, 86),  # "I have tried also kexec-2.0.20" ... "Cannot load /tmp/kernel"
        "hummingboard": _lines(a80, 147, 203),  # RMK's two Hummingboard runs (2.0.20, no initrd, then one)
        "log_a": _lines(a80, 292, 350),  # the rebuilt setup, its Bye! and its C: line
        "log_a_no_copy": _lines(a80, 292, 349),
        "copy": _lines(a80, 350, 350),
    }


def _analyze(tmp_path, capsys, text: str, *extra: str) -> tuple[int, dict]:
    path = tmp_path / "report.txt"
    path.write_text(text)
    code = main(["analyze", str(path), "--json", *extra])
    out = capsys.readouterr().out
    return code, json.loads(out) if out.strip() else {}


# --- the A80 thread pasted whole ----------------------------------------------------------------------


def test_a80_thread_is_seven_attempts_each_with_its_own_numbers(a80):
    paste = split_attempts(a80)
    attempts = paste.attempts
    assert [a.index for a in attempts] == [1, 2, 3, 4, 5, 6, 7]
    # Kernel: lines as printed: A80 x2 (the second never loaded), RMK's VM, Hummingboard x2, clearfog, A80
    assert [a.log.kernel.address if a.log.kernel else None for a in attempts] == [
        0x20008000,
        None,
        0x40008000,
        0x10008000,
        0x10008000,
        0x8000,
        0x20008000,
    ]
    assert [a.log.zimage_size for a in attempts] == [0x853200, None, 0x407358, 0x7273A8, 0x7273A8, 0x7273A8, 0x443AC0]
    assert attempts[1].log.header == (0, 0x19B4, 0x1000)  # "zImage header: 0x00000000 0x000019b4 0x00001000"
    # the line ranges are the paste's: attempt 2 is "Try gzip decompression." .. "Cannot load /tmp/kernel"
    assert attempts[1].lines == (82, 86)
    assert attempts[0].lines[0] < attempts[0].lines[1] < attempts[1].lines[0]


def test_a80_thread_ties_the_c_line_to_the_last_attempt_only(a80):
    paste = split_attempts(a80)
    tied = {a.index: a.copy for a in paste.attempts if a.copy is not None}
    assert list(tied) == [7]
    c = tied[7].copy
    assert (c.src_start, c.src_end, c.dst_start, c.dst_end) == A80_COPY
    assert paste.attempts[6].log.decompressor_copy == c
    # Attempt 1 loaded a 0x853200-byte zImage at 0x20008000 too: its copy would end at
    # roundup32(0x20008000 + 0x853200) = 0x2085B200, not 0x2044BAC0.
    assert paste.attempts[0].log.decompressor_copy is None
    assert paste.unattributed == ()


def test_a80_thread_kexec_and_kernel_versions(a80):
    attempts = split_attempts(a80).attempts
    # "But kexec 2.0.18 fail to work:", "I have tried also kexec-2.0.20", RMK's `kexec --version` twice
    # (then the same build/sbin/kexec), "go back to kexec-tool 2.0.18" before the last attempt.
    assert [a.kexec_version for a in attempts] == ["2.0.18", "2.0.20", "2.0.20", "2.0.20", "2.0.20", "2.0.20", "2.0.18"]
    assert attempts[2].kexec_version_source == "kexec --version"
    assert attempts[0].kexec_version_source == "text"
    # RMK loads virt-vmlinuz-5.4.0+ and multi-vmlinuz-5.6.0+ (the initrd.img-5.4.0+ is not the kernel)
    assert [a.kernel_version for a in attempts] == [None, None, "5.4.0+", "5.6.0+", "5.6.0+", "5.6.0+", None]
    assert attempts[4].kernel_version_source == "zImage file name"
    assert attempts[0].command is not None and "--command-line" in attempts[0].command.options
    assert [a.executed for a in attempts] == [True, False, False, False, False, False, True]


def test_a80_thread_verdict_per_attempt(a80, tmp_path, capsys):
    code, out = _analyze(tmp_path, capsys, a80)
    verdicts = [a["verdict"] for a in out["attempts"]]
    # 1: initrd at 0x21df8000; worst case copy end ((0x20008000 + 0x158b3a0 + 0xC00) & ~255) - 0xC0 + 0x853200
    #    = 0x21DE7040, + 0x11000 = 0x21DF8040: only the malloc top reaches the initrd with TEXT_OFFSET 0x8000;
    #    TEXT_OFFSET 0x208000 moves the copy 2 MiB up, over it (DOMAIN 2.4 / 4): unknown.
    # 2: never loaded (DOMAIN 9.2). 3: DT at 0x41051000; worst case footprint end
    #    ((0x40008000 + 0xc2ed24 + 0xC00) & ~255) - 0xC0 + 0x407358 + 0x11000 = 0x4104FB98 with 0x8000,
    #    2 MiB higher with 0x208000: unknown. 4-6: DOMAIN 4 log B (and its no-initrd twin: the kernel needs up to
    #    0x1150F7B0, the DT is at 0x11511000; 0x1170F7B0 with 0x208000): unknown. 7: DOMAIN 4 log A: safe, the
    #    malloc arena's top 0x500 bytes over the initrd only.
    assert verdicts == ["unknown", "not loaded", "unknown", "unknown", "unknown", "unknown", "safe"]
    assert out["verdict"] == "unknown" and code == 3
    assert out["decided_by"] == 1
    assert all(
        any(d.startswith("TEXT_OFFSET: safe for 0x8000;") and "--text-offset" in d for d in a["decide"])
        for a in out["attempts"]
        if a["verdict"] == "unknown"
    )
    last = out["attempts"][6]
    assert last["copy"]["text"] == "C:0x200080C0-0x2044BAC0->0x20B80B00-0x20FC4500"
    layout = {r["name"]: (r["start"], r["end"]) for r in last["prediction"]["layout"]}
    assert layout["decompressor.copy"] == (0x20B80B00, 0x20FC4500)
    assert [(c["start"], c["end"], c["severity"]) for c in last["prediction"]["collisions"]] == [
        (0x20FD5000, 0x20FD5500, "benign")
    ]
    assert last["lines"][1] < last["copy"]["line"]


def test_a80_thread_with_text_offset_decides_every_attempt(a80, tmp_path, capsys):
    code, out = _analyze(tmp_path, capsys, a80, "--text-offset", "0x8000")
    assert code == 0 and out["verdict"] == "safe"
    code, out = _analyze(tmp_path, capsys, a80, "--text-offset", "0x208000")
    # DOMAIN 4's caveat: with TEXT_OFFSET 0x208000 log B's kernel (to 0x1170F7B0) runs over its initrd
    assert code == 1 and out["verdict"] == "collision"
    hb = out["attempts"][4]
    assert any(c["b"] == "initrd" and c["start"] == 0x11510000 for c in hb["prediction"]["collisions"])


def test_the_failed_2_0_20_attempt_is_the_option_clash(a80):
    paste = split_attempts(a80)
    v = judge(paste).attempts[1]
    assert v.verdict == "not loaded"
    d = v.diagnoses[0]
    assert d.kind == "option-clash"
    # "Could not find a free area of memory of 0x86c1c0 bytes" = zImage requires 0x8641c0 + 0x8000
    assert any("0x86c1c0" in e and "0x8641c0 + 0x8000" in e for e in d.evidence)
    assert any("0x00000000 0x000019b4 0x00001000" in e for e in d.evidence)
    assert any("2.0.21" in a for a in d.advice)  # fixed in 2.0.21 (DOMAIN 9.2)
    assert any("/chosen" in a for a in d.advice)


def test_rmk_vm_attempt_is_judged_although_kexec_load_failed(a80):
    v = judge(split_attempts(a80)).attempts[2]
    assert v.verdict in ("safe", "unknown", "collision")  # the plan is judged
    assert [d.kind for d in v.diagnoses] == ["kexec-load-refused"]
    assert "Function not implemented" in v.diagnoses[0].summary


def test_legacy_reader_still_gives_the_last_run(a80):
    log = parse_kexec_log(a80)
    assert log.initrd is not None and log.initrd.address == 0x20FD5000  # Initrd: address=0x20fd5000


# --- logs cut and glued from the thread -----------------------------------------------------------------


def test_a_last_attempt_that_failed_to_load_keeps_the_first_verdict(a80, tmp_path, capsys):
    p = _parts(a80)
    code, out = _analyze(tmp_path, capsys, p["first"] + p["failed"])
    assert [a["verdict"] for a in out["attempts"]] == ["unknown", "not loaded"]
    assert out["verdict"] == "unknown" and code == 3  # not 2: the first attempt is complete
    code, out = _analyze(tmp_path, capsys, p["log_a"] + p["failed"])
    assert [a["verdict"] for a in out["attempts"]] == ["safe", "not loaded"]
    assert out["verdict"] == "safe" and code == 0


def test_only_a_failed_attempt_is_not_loaded_exit_4(a80, tmp_path, capsys):
    code, out = _analyze(tmp_path, capsys, _parts(a80)["failed"])
    assert code == 4 and out["verdict"] == "not loaded"
    assert out["attempts"][0]["diagnoses"][0]["kind"] == "option-clash"


def test_c_line_goes_to_the_build_it_fits_not_the_attempt_before_it(a80):
    p = _parts(a80)
    # first attempt + the failed one + the later rebuilt one, with its own C: line
    paste = split_attempts(p["first"] + p["failed"] + p["log_a"])
    assert [a.copy is not None for a in paste.attempts] == [False, False, True]
    # the rebuilt attempt first, then the first attempt, then the C: line: position says attempt 2, numbers 1
    paste = split_attempts(p["log_a_no_copy"] + p["first"] + p["copy"])
    assert [a.log.zimage_size for a in paste.attempts] == [0x443AC0, 0x853200]
    assert paste.attempts[0].copy is not None and paste.attempts[1].copy is None
    assert paste.attempts[0].log.decompressor_copy.dst_start == 0x20B80B00


def test_c_line_that_fits_no_attempt_is_not_used(a80, tmp_path, capsys):
    p = _parts(a80)
    text = p["hummingboard"] + p["copy"]  # the A80's C: line after the Hummingboard runs (RAM at 0x10000000)
    paste = split_attempts(text)
    assert all(a.copy is None for a in paste.attempts)
    assert len(paste.unattributed) == 1 and "fits no attempt" in paste.unattributed[0].reason
    code, out = _analyze(tmp_path, capsys, text)
    assert out["unattributed"][0]["text"].startswith("C:0x200080C0")
    # log B is still judged from its own numbers: TEXT_OFFSET decides it (DOMAIN 4)
    assert out["attempts"][1]["verdict"] == "unknown" and code == 3
    assert not any("C: line" in a for a in out["attempts"][1]["prediction"]["assumptions"])


def test_kernel_messages_after_bye_are_the_new_kernels(a80):
    p = _parts(a80)
    running = "[    0.000000] Linux version 5.4.0-rc7 (rmk@rmk-PC) (gcc version 8.3.0) #1 SMP\n"
    new = (
        "Uncompressing Linux... done, booting the kernel.\n"
        "[    0.000000] Linux version 5.6.0-rc1 (corentin@build) (gcc version 9.2.0) #3 SMP\n"
        "[    2.412345] Initramfs unpacking failed: invalid magic at start of compressed archive\n"
    )
    paste = split_attempts(running + p["log_a"] + new + p["failed"])
    a = paste.attempts[0]
    assert a.kernel_version == "5.6.0-rc1" and a.kernel_version_source == "banner after Bye!"
    assert a.running_kernel == "5.4.0-rc7"
    assert [m.kind for m in a.messages] == ["uncompressing", "banner", "bad-archive"]
    # the failed attempt after it gets none of them
    assert paste.attempts[1].messages == () and paste.attempts[1].kernel_version is None


def test_kexec_file_load_refusal(tmp_path, capsys):
    # README: `kexec -s` on 32-bit ARM fails at load with this line (exit 253)
    code, out = _analyze(tmp_path, capsys, "# kexec -s -d -l /boot/zImage\nsyscall kexec_file_load not available.\n")
    assert code == 4
    assert out["attempts"][0]["diagnoses"][0]["kind"] == "file-load-refused"


def test_a80_first_attempt_fell_back_from_kexec_file_load(a80):
    v = judge(split_attempts(_parts(a80)["first"])).attempts[0]
    assert "file-load-fallback" in [d.kind for d in v.diagnoses] and v.verdict == "unknown"


def test_not_a_zimage_with_memory_ranges_still_placed(a80):
    # the first attempt with a header whose magic is not 0x016f2818 (a corrupt file), RAM still read
    text = _parts(a80)["first"].replace("0x016f2818", "0x12345678")
    v = judge(split_attempts(text)).attempts[0]
    assert v.diagnoses[0].kind == "not-a-zimage" and not v.diagnoses[0].blocks_load


def test_nothing_to_judge_is_one_line_exit_2(tmp_path, capsys):
    path = tmp_path / "cut.txt"
    path.write_text("MEMORY RANGES\n0000000020000000-000000009fffffff (0)\n")
    assert main(["analyze", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nothing to judge" in err


def test_attempt_option_out_of_range(a80, tmp_path, capsys):
    path = tmp_path / "a80.txt"
    path.write_text(a80)
    assert main(["analyze", str(path), "--attempt", "8"]) == 2
    assert "holds 7 attempts" in capsys.readouterr().err
    assert main(["analyze", str(path), "--attempt", "7", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [a["index"] for a in out["attempts"]] == [7] and out["verdict"] == "safe"


def test_zimage_of_another_build_is_not_applied(a80):
    class Other:  # stands in for the Hummingboard's zImage (0x7273a8 bytes): only its size is read
        size = 0x7273A8

    v = judge(split_attempts(_parts(a80)["log_a"]), Inputs(zimage=Other())).attempts[0]  # type: ignore[arg-type]
    assert any("--zimage not used" in n for n in v.notes) and v.verdict == "safe"


# --- the 2016 thread, flattened onto one line -------------------------------------------------------------


def test_flattened_2016_thread_has_no_attempt(seed_text, tmp_path, capsys):
    text = seed_text("thread_2016_debug_rodata")
    with pytest.raises(KexecLogError, match="no attempt"):
        split_attempts(text)
    path = tmp_path / "t.txt"
    path.write_text(text)
    assert main(["analyze", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no attempt" in err and "flattened" in err


def test_flattened_log_reads_like_the_original(a80):
    log_a = _parts(a80)["log_a"]
    flat = " ".join(line.strip() for line in log_a.splitlines())  # one line, "> " markers inline
    assert "\n" not in flat
    original, flattened = split_attempts(log_a).attempts, split_attempts(flat).attempts
    assert len(flattened) == 1
    assert flattened[0].log == original[0].log
    assert flattened[0].log.dtb.address == 0x22648000  # "segment[2].mem = 0x2[ 31.265096] ..." + "2648000"
    assert flattened[0].copy is not None and flattened[0].lines == (1, 1)


# --- replay --from-log --attempt ------------------------------------------------------------------------


def test_replay_picks_the_first_complete_attempt(a80, tmp_path):
    path = tmp_path / "a80.txt"
    path.write_text(a80)
    assert pick_attempt(str(path), None).index == 1
    assert pick_attempt(str(path), 7).log.initrd.address == 0x20FD5000
    with pytest.raises(UserError, match="holds 7 attempt"):
        pick_attempt(str(path), 9)
    with pytest.raises(UserError, match="lacks MEMORY RANGES"):
        pick_attempt(str(path), 2)
    import argparse

    args = argparse.Namespace(from_log=str(path), attempt=5, kernel_at=None, dtb_at=None, initrd_at=None)
    m = get_machine("virt")
    # log B relative to its RAM base 0x10000000: Kernel +0x8000, Initrd +0x1510000, DT +0x1a50000 (DOMAIN 4)
    assert _addresses(args, m) == (
        m.ram_base + 0x8000,
        m.ram_base + 0x1510000,
        m.ram_base + 0x1A50000,
        0x53F46A,
    )
    with pytest.raises(UserError, match="--from-log"):
        _addresses(argparse.Namespace(from_log=None, attempt=2, kernel_at=None, dtb_at=None), m)


# --- never a traceback ---------------------------------------------------------------------------------

A80_TEXT = (__import__("pathlib").Path(__file__).parent / "data" / "thread_2020_a80.txt").read_text()


@settings(max_examples=150, deadline=None)
@given(cut=st.integers(0, len(A80_TEXT)), start=st.integers(0, len(A80_TEXT)), noise=st.text(max_size=60))
def test_any_cut_of_the_thread_is_judged_or_refused_in_one_line(cut, start, noise):
    text = A80_TEXT[min(start, cut) : cut]
    text = text[: len(text) // 2] + noise + text[len(text) // 2 :]
    try:
        paste = split_attempts(text)
    except KexecLogError:
        return
    result = judge(paste)
    assert result.verdict in ("safe", "collision", "unknown", "not loaded", "incomplete")
    json.dumps(result.to_dict())


def test_new_kernels_banner_decides_the_kernel_address_fallback(seed_text):
    # Log B moved to RAM at 0x0C000000 (kexec's placement is relative to the RAM base, DOMAIN 3.2): before
    # Linux 5.12 the decompressor takes K = (L & 0xF8000000) + TEXT_OFFSET = 0x08008000, outside RAM; from 5.12
    # on it falls back to the RAM base (DOMAIN 9.3), where log B is safe with TEXT_OFFSET 0x8000 (DOMAIN 4).
    moved = seed_text("seed_b")
    for old, new in (
        ("0000000010000000-000000004fffffff", "000000000c000000-000000004fffffff"),
        ("0x10008000", "0x0c008000"),
        ("0x11510000", "0x0d510000"),
        ("0x11a50000", "0x0da50000"),
        ("multi-vmlinuz-5.6.0+", "zImage"),
    ):
        moved = moved.replace(old, new)
    bye = "[   31.692085] Bye!\n"
    verdicts = {}
    for banner in ("5.10.0-32-armmp", "6.1.0-57-armmp"):
        text = moved + bye + f"[    0.000000] Linux version {banner} (debian-kernel@lists.debian.org) #1 SMP\n"
        v = judge(split_attempts(text), Inputs(text_offset=0x8000)).attempts[0]
        assert v.attempt.kernel_version == banner
        verdicts[banner] = v.verdict
    assert verdicts == {"5.10.0-32-armmp": "collision", "6.1.0-57-armmp": "safe"}
    # without a banner the fallback decides it, and the output says how to give it
    v = judge(split_attempts(moved), Inputs(text_offset=0x8000)).attempts[0]
    assert v.verdict == "unknown" and any("--kernel-version" in d for d in v.decide)
