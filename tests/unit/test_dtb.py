"""testbench.inputs.dtb against dtc and fdtget (device-tree-compiler), a second implementation: a tree written
here must read back there, and what dtc wrote must read here."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from testbench.inputs import dtb

pytestmark = pytest.mark.skipif(
    shutil.which("dtc") is None or shutil.which("fdtget") is None,
    reason="needs dtc and fdtget (apt-get install device-tree-compiler)",
)

BOARD = """/dts-v1/;
/ {
	#address-cells = <1>;
	#size-cells = <1>;
	model = "testbench board";
	chosen { rng-seed = <0x1 0x2>; };
	memory@60000000 { device_type = "memory"; reg = <0x60000000 0x40000000>; };
};
"""


def _compile(dts: str) -> bytes:
    return subprocess.run(
        ["dtc", "-q", "-I", "dts", "-O", "dtb", "-"], input=dts.encode(), capture_output=True, check=True
    ).stdout


def _fdtget(path: Path, node: str, prop: str, kind: str = "x") -> str:
    return subprocess.run(
        ["fdtget", "-t", kind, str(path), node, prop], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_reads_what_dtc_wrote() -> None:
    data = _compile(BOARD)
    assert dtb.get_string(data, "/", "model") == "testbench board"
    assert dtb.get_cells(data, "/memory@60000000", "reg") == [0x60000000, 0x40000000]
    assert dtb.get_cells(data, "/chosen", "bootargs") is None
    assert dtb.get_string(data, "/nowhere", "model") is None
    assert dtb.subnodes(data, "/") == ["chosen", "memory@60000000"]
    assert dtb.cells_value([0x1, 0x50000000]) == 0x150000000


def test_edits_read_back_with_fdtget(tmp_path: Path) -> None:
    tree = dtb.Editor(_compile(BOARD))
    tree.set_string("/chosen", "bootargs", "console=ttyAMA0 " + "x" * 5000)  # more than the blob's free room
    tree.delete("/chosen", "rng-seed")
    tree.delete("/chosen", "not-there")  # deleting what is absent is no error
    tree.set_cells("/chosen", "linux,initrd-start", (0x62000000, 1))
    tree.set_cells("/new/deep", "reg", (0x1_2345_6789, 2), (0x1000, 1))  # parents are created
    tree.set_empty("/new/deep", "no-map")
    out = tmp_path / "edited.dtb"
    out.write_bytes(bytes(tree))
    assert _fdtget(out, "/chosen", "bootargs", "s") == "console=ttyAMA0 " + "x" * 5000
    assert _fdtget(out, "/chosen", "linux,initrd-start") == "62000000"
    assert _fdtget(out, "/new/deep", "reg") == "1 23456789 1000"
    props = subprocess.run(["fdtget", "-p", str(out), "/chosen"], capture_output=True, text=True).stdout.split()
    assert "rng-seed" not in props
    assert (
        "no-map"
        in subprocess.run(["fdtget", "-p", str(out), "/new/deep"], capture_output=True, text=True).stdout.split()
    )
    dtb.check(out.read_bytes())  # and the whole tree is still well formed


def test_check_refuses_a_broken_structure_block() -> None:
    data = bytearray(_compile(BOARD))
    struct_at = int.from_bytes(data[8:12], "big")
    data[struct_at : struct_at + 4] = b"\xff\xff\xff\xff"  # the first tag is no FDT_BEGIN_NODE any more
    with pytest.raises(dtb.DtbError):
        dtb.check(bytes(data))
    with pytest.raises(dtb.DtbError):
        dtb.check(b"not a device tree at all")
