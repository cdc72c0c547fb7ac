"""Fuzzing the DTB check (issue 7.4): any bytes given as --dtb end in a UserError or in acceptance, never in
another exception. check_dtb runs dtc on the file, so these examples exercise dtc's reader too."""

from __future__ import annotations

import shutil
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from testbench.errors import UserError
from testbench.inputs.checks import FDT_MAGIC, check_dtb

DTS = """/dts-v1/;
/ {
    model = "testbench fuzz seed";
    #address-cells = <1>;
    #size-cells = <1>;
    chosen { bootargs = "console=ttyAMA0"; };
    memory@40000000 { device_type = "memory"; reg = <0x40000000 0x20000000>; };
};
"""


@pytest.fixture(scope="module")
def seed_dtb() -> bytes:
    dtc = shutil.which("dtc")
    if dtc is None:
        pytest.skip("dtc is absent (apt-get install device-tree-compiler): check_dtb cannot accept any DTB")
    return subprocess.run(
        [dtc, "-q", "-I", "dts", "-O", "dtb"], input=DTS.encode(), capture_output=True, check=True
    ).stdout


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    # One module-scoped dir: hypothesis forbids function-scoped fixtures such as tmp_path across examples.
    with tempfile.TemporaryDirectory(prefix="tb-fuzz-dtb-") as d:
        yield Path(d)


def _check(scratch: Path, raw: bytes) -> bool:
    """True if accepted, False if refused with a UserError; any other exception fails the test."""
    path = scratch / "fuzz.dtb"
    path.write_bytes(raw)
    try:
        assert check_dtb(path) == path
    except UserError as err:
        assert "\n" not in str(err), "a refusal must be one line"
        return False
    return True


def test_seed_is_accepted(scratch: Path, seed_dtb: bytes) -> None:
    # Without this the properties below would also hold for a check_dtb that refuses everything.
    assert _check(scratch, seed_dtb)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=512))
def test_random_bytes(scratch: Path, raw: bytes) -> None:
    accepted = _check(scratch, raw)
    if raw[:4] != FDT_MAGIC:  # no magic, no device tree: a check that accepted it would be wrong
        assert not accepted


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.lists(st.integers(0, 0xFFFFFFFF), min_size=0, max_size=9), body=st.binary(max_size=512))
def test_magic_with_random_header_and_body(scratch: Path, header: list[int], body: bytes) -> None:
    # Past the magic check, so dtc's reader sees every kind of header: offsets and sizes out of range.
    raw = FDT_MAGIC + struct.pack(f">{len(header)}I", *header) + body
    if _check(scratch, raw):
        assert struct.unpack_from(">I", raw, 4)[0] <= len(raw)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_valid_dtb(scratch: Path, seed_dtb: bytes, data: st.DataObject) -> None:
    raw = bytearray(seed_dtb)
    for _ in range(data.draw(st.integers(1, 8))):
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    accepted = _check(scratch, bytes(raw[:cut]))
    if cut < 8 or cut < struct.unpack_from(">I", raw, 4)[0]:  # shorter than the size its header claims
        assert not accepted
