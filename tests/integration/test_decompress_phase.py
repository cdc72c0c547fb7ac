"""The `decompress` phase for real: Debian's zImage with 16 bytes of its XZ payload inverted.

The decompressor relocates itself above the kernel it will inflate, decodes until the damage, and its XZ
decoder reports the data corrupt; error() prints nothing (no DEBUG_LL in Debian's build) and ends in a
branch-to-self with interrupts masked. So the kernel-entry breakpoint never fires, and the bench must say
so, with the phase `decompress`, and hand over what it can see: the PC, the message, how far the output got.

Facts used as expected values, not taken from the code: TEXT_OFFSET 0x208000 (DOMAIN 8.1) and the inflated
size, which belongs to the build and is decoded here from the zImage's XZ stream (debian_kernel); the XZ
payload fills the zImage from ~0xe000 to the size pointer (0x531871 on 6.1.0-50, DOMAIN 8.1), so the middle
of the file is compressed data; the
kernel's XZ wrapper calls its error handler with "XZ-compressed data is corrupt" on a data error; `b .` in
ARM state is 0xeafffffe.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from debian_kernel import package_facts

from testbench.emulator.console import timeout_factor
from testbench.replay import ReplayRequest, replay
from testbench.replay_cli import request_from_args

TEXT_OFFSET = 0x208000
XZ_DATA_ERROR = "XZ-compressed data is corrupt"
ARM_B_SELF = bytes.fromhex("feffffea")
VIRT_BASE = 0x40000000


def _args(out: Path, kernel: Path, **kw) -> ReplayRequest:
    base = dict(
        machine="virt",
        ram=None,
        kernel=str(kernel),
        initrd=None,
        initrd_size=None,
        seed=1,
        dtb=None,
        kernel_at="+0x8000",
        initrd_at=None,
        dtb_at="+0x2800000",
        from_log=None,
        until=None,
        decompress_deadline=None,
        no_halt_check=False,
        out=str(out),
    )
    return request_from_args(argparse.Namespace(**(base | kw)))


@pytest.fixture(scope="module")
def corrupt_zimage(images, tmp_path_factory) -> Path:
    data = bytearray(images.zimage.read_bytes())
    middle = len(data) // 2
    for i in range(middle, middle + 16):
        data[i] ^= 0xFF
    path = tmp_path_factory.mktemp("zimage") / "vmlinuz-corrupt"
    path.write_bytes(bytes(data))
    return path


@pytest.fixture(scope="module")
def halted(corrupt_zimage, tmp_path_factory) -> dict:
    """One replay with the halt check (the default): shared by the tests that read its result."""
    return replay(_args(tmp_path_factory.mktemp("halted") / "replay", corrupt_zimage))


def _hang(result: dict) -> dict:
    return result["observed"]["hang"]


def test_corrupt_payload_is_the_decompress_phase(halted):
    assert halted["verdict"] == "fail" and halted["phase"] == "decompress", halted["reasons"]
    stops = {s["name"]: s for s in halted["observed"]["stops"]}
    assert stops["zimage"]["reached"] and not stops["kernel"]["reached"]
    assert halted["reasons"][0].startswith(
        f"the kernel entry {VIRT_BASE + TEXT_OFFSET:#x} never came within the decompress deadline"
    )
    # Nothing of the layout was damaged, and the oracle (no collision for this layout) agrees.
    assert halted["observed"]["clobbered"] == []
    assert halted["oracle_agrees"] is True, halted["oracle_difference"]


def _inflated(images) -> int:
    """The size of the kernel Image the intact zImage inflates to, decoded here from its XZ stream (not read
    from the size tag the code under test reads): it belongs to the build."""
    inflated = package_facts(images.zimage).inflated_size
    assert inflated, "the Debian zImage's XZ stream did not decode"
    return inflated


def test_the_post_mortem_finds_the_halt_loop_in_the_relocated_decompressor(halted, corrupt_zimage, images):
    hang = _hang(halted)
    assert hang["halted_for_good"] is True and "never will" in halted["reasons"][0]
    # The PC's bytes were found in the zImage file: there they are a `b .`.
    image = corrupt_zimage.read_bytes()
    assert image[hang["zimage_offset"] : hang["zimage_offset"] + 4] == ARM_B_SELF
    # The loop runs from the relocated copy, which sits just above the kernel being inflated (the copy
    # starts with the code after the relocation, so file offset 0 itself maps a little below the end).
    kernel_end = VIRT_BASE + TEXT_OFFSET + _inflated(images)
    assert kernel_end <= hang["pc"] < kernel_end + len(image)
    assert "decompressor.copy" in hang["where"]


def test_the_post_mortem_quotes_the_decoder_error_and_how_far_the_output_got(halted, corrupt_zimage, images):
    hang = _hang(halted)
    assert XZ_DATA_ERROR.encode() in corrupt_zimage.read_bytes()
    assert any(k.get("past") == XZ_DATA_ERROR for k in hang["strings"].values()), hang["strings"]
    assert any(XZ_DATA_ERROR in r for r in halted["reasons"])
    # The damage is mid-stream: part of the kernel was written, not all of it.
    inflated = _inflated(images)
    assert hang["output_start"] == VIRT_BASE + TEXT_OFFSET and hang["output_size"] == inflated
    assert hang["output_start"] < hang["output_end"] < hang["output_start"] + inflated
    assert any("the decompressed kernel was written up to" in r for r in halted["reasons"])


def test_the_hung_state_is_dumped(halted):
    dumps = Path(halted["observed"]["dumps"])
    names = {p.name for p in dumps.iterdir()}
    assert {
        "hung-decompress-kernel-40008000.bin",
        "hung-decompress-dtb-42800000.bin",
        "hung-decompress-ram.bin",
    } <= names, names
    on_disk = json.loads((dumps.parent / "result.json").read_text())
    assert on_disk["phase"] == "decompress" and on_disk["observed"]["hang"]["pc"] == _hang(halted)["pc"]


def test_without_the_halt_check_the_deadline_ends_the_wait_at_the_same_loop(halted, corrupt_zimage, tmp_path):
    # 10 s leaves five times the ~2 s the decoder needs to reach the damage (DOMAIN 8.5: 2 s for all of it).
    result = replay(_args(tmp_path / "replay", corrupt_zimage, decompress_deadline=10.0, no_halt_check=True))
    deadline = 10.0 * timeout_factor()
    hang = _hang(result)
    assert result["phase"] == "decompress" and hang["deadline"] == round(deadline, 1)
    assert result["reasons"][0].startswith(
        f"the kernel entry {VIRT_BASE + TEXT_OFFSET:#x} never came within the decompress deadline "
        f"({deadline:.0f} s); halted after"
    )
    # The deadline was waited out, and the CPU was found where the halt check found it.
    assert hang["waited"] >= deadline
    assert hang["pc"] == _hang(halted)["pc"] and hang["insn"] == "eafffffe"
    assert hang["found_by"] == "deadline" and _hang(halted)["found_by"] == "halt check"


def test_run_observe_through_kexec_reports_the_decompress_phase(run_kexec_case, corrupt_zimage):
    """The same zImage through stage 1 and a real kexec -e, with a safe placement (DOMAIN 8.3): only the
    payload damage can stop it."""
    result = run_kexec_case("virt", kernel=corrupt_zimage, kexec_args=("--image-size=0x2000000",), observe=True)
    assert result.verdict.verdict == "fail" and result.verdict.phase == "decompress", result.verdict
    assert result.observed["stops"][0]["reached"] and not result.observed["stops"][1]["reached"]
    assert result.observed["clobbered"] == []
    reasons = result.verdict.reasons
    assert reasons[0].startswith(
        f"the kernel entry {VIRT_BASE + TEXT_OFFSET:#x} never came within the decompress deadline"
    )
    assert any(XZ_DATA_ERROR in r for r in reasons), reasons
    assert "stop_zimage" in result.timings and "stop_kernel" not in result.timings
