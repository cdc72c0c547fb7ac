"""The stage-2 payload check: the digest the host expects is the one the init's own shell code computes.

The init's payload-check lines (between its `>>> payload check` and `<<< payload check` markers) run here
under the host's sh with coreutils' dd and sha256sum standing in for busybox's, on a temp file standing in
for /payload.bin: host and guest must agree byte for byte, or every sampled cell would fail.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from testbench.datafiles import data_path
from testbench.machines import get_machine
from testbench.payload_check import FULL, FULL_UP_TO, PayloadCheck, choose, parse_spec
from testbench.prepare import CaseRequest
from testbench.verdict import judge_stage2

INIT = data_path("stage2", "init")
needs_tools = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("sh", "dd", "sha256sum")), reason="needs sh, dd and sha256sum on the host"
)


def _init_check(tmp_path: Path, payload: bytes, words: str) -> tuple[str, str]:
    text = INIT.read_text()
    section = text[text.index("# >>> payload check") : text.index("# <<< payload check")]
    target = tmp_path / "payload.bin"
    target.write_bytes(payload)
    script = f'bb=\nwords="{words}"\nsize={len(payload)}\n' + section.replace("/payload.bin", str(target))
    done = subprocess.run(["sh", "-c", script + '\necho "$check $payload"\n'], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    check, digest = done.stdout.split()
    return check, digest


@needs_tools
def test_the_init_computes_the_sample_digest_the_host_expects(tmp_path):
    payload = os.urandom((5 << 20) + 12345)  # not a whole number of blocks: the last one is short
    check = PayloadCheck("sample", 16, 64 << 10, 7)
    spec, digest = _init_check(tmp_path, payload, f"console=ttyAMA0 {check.cmdline_word} panic=-1")
    assert spec == "sample:16:65536:7"
    assert digest == check.digest(payload)


@needs_tools
def test_without_the_word_the_init_hashes_the_whole_payload(tmp_path):
    payload = os.urandom(300_000)
    spec, digest = _init_check(tmp_path, payload, "console=ttyAMA0 panic=-1")
    assert (spec, digest) == ("full", hashlib.sha256(payload).hexdigest())


def test_a_sample_sees_a_changed_block_and_a_changed_size():
    check = PayloadCheck("sample", 4, 4096, 1)
    payload = bytearray(os.urandom(64 * 4096))
    base = check.digest(bytes(payload))
    changed = bytearray(payload)
    changed[check.blocks(len(payload))[2] * 4096 + 100] ^= 0xFF  # a byte in a seeded block
    assert check.digest(bytes(changed)) != base
    assert check.digest(bytes(payload) + b"\0") != base  # one byte longer: the size line differs
    assert check.digest(bytes(payload[:-1])) != base


def test_blocks_start_with_the_first_and_last_and_follow_the_lcg():
    # x1 = (1 * 1103515245 + 12345) mod 2^31 = 1103527590; 1103527590 mod 100 = 90 (by hand)
    assert PayloadCheck("sample", 1, 512, 1).blocks(100 * 512) == [0, 99, 90]
    picks = PayloadCheck("sample", 16, 65536, 3).blocks(100 << 20)
    assert len(picks) == 18 and picks[:2] == [0, 1599] and all(0 <= p < 1600 for p in picks)


@pytest.mark.parametrize(
    ("observing", "full_hash", "size", "mode"),
    [
        (True, False, 100 << 20, "sample"),
        (True, False, FULL_UP_TO, "full"),  # small: the full hash is cheap
        (True, True, 100 << 20, "full"),  # asked for
        (False, False, 100 << 20, "full"),  # nothing else proves the bytes
    ],
)
def test_choose(observing, full_hash, size, mode):
    assert choose(observing, full_hash, size, 5).mode == mode


def test_the_command_line_asks_for_the_check_the_request_chose(tmp_path):
    virt = get_machine("virt")
    words = CaseRequest(machine=virt, ram=1 << 30, out=tmp_path, initrd_size=32 << 20, seed=4).stage2_cmdline.split()
    assert "tb.payload=sample:16:65536:4" in words and "cryptomgr.notests" in words and words[-1] == "panic=-1"
    for options in ({"observe": False}, {"full_hash": True}, {"initrd_size": 1 << 20}):
        request = CaseRequest(machine=virt, ram=1 << 30, out=tmp_path, **({"initrd_size": 32 << 20} | options))
        assert not any(w.startswith("tb.payload=") for w in request.stage2_cmdline.split()), options


def test_parse_spec_round_trips_and_defaults_to_full():
    check = PayloadCheck("sample", 16, 65536, 9)
    assert parse_spec(check.spec) == check
    assert parse_spec(None) == FULL and parse_spec("full") == FULL


def test_a_wrong_sample_digest_fails_and_says_it_was_a_sample():
    marker = (
        'TESTBENCH-STAGE2 {"cmdline": "c", "iomem_ram": [], "fdt_sha256": "f", "payload_sha256": "aa", '
        '"payload_size": 1, "payload_check": "sample:16:65536:1", "uptime": 1.5, "uptime_end": 1.75}\n'
    )
    verdict = judge_stage2(marker, "c", "bb", "marker")
    assert verdict.verdict == "fail" and "sample" in verdict.reasons[0]
    assert judge_stage2(marker, "c", "aa", "marker").verdict == "pass"
