"""RAM maps: the System RAM ranges a hole leaves, and the DTB that makes the hole (checked with fdtget)."""

import shutil
import subprocess

import pytest

from testbench.errors import UserError
from testbench.inputs.memmap import MemMap, get_memmap, with_holes
from testbench.machines import get_machine

MiB = 1 << 20


def test_hole_splits_system_ram():
    hole = MemMap("h", ((32 * MiB, 16 * MiB),))
    assert hole.ram_ranges(0x40000000, 512 * MiB) == [(0x40000000, 0x42000000), (0x43000000, 0x60000000)]


def test_hole_at_the_top_and_overlapping_holes():
    top = MemMap("t", ((496 * MiB, 16 * MiB),))
    assert top.ram_ranges(0x60000000, 512 * MiB) == [(0x60000000, 0x7F000000)]
    both = MemMap("b", ((32 * MiB, 16 * MiB), (40 * MiB, 16 * MiB)))
    assert both.ram_ranges(0, 128 * MiB) == [(0, 32 * MiB), (56 * MiB, 128 * MiB)]


def test_shipped_map_and_unknown_name():
    assert get_memmap("hole32M").no_map == ((32 * MiB, 16 * MiB),)
    assert get_memmap("plain").no_map == ()
    with pytest.raises(UserError, match="unknown memory map"):
        get_memmap("swiss-cheese")


def test_hole_over_the_stage1_initramfs_is_refused():
    # QEMU loads stage 1's initramfs at base + min(RAM/2, 128M): with 128M of RAM that is +64M.
    with pytest.raises(UserError, match="initramfs"):
        MemMap("late", ((60 * MiB, 8 * MiB),)).check(get_machine("virt"), 128 * MiB)


@pytest.mark.skipif(shutil.which("dtc") is None or shutil.which("fdtget") is None, reason="needs dtc and fdtget")
def test_with_holes_adds_no_map_nodes(tmp_path):
    # A minimal board: 2 address and 2 size cells at the root, as QEMU's virt DTB has.
    dts = (
        "/dts-v1/;\n/ {\n\t#address-cells = <2>;\n\t#size-cells = <2>;\n\tmemory@40000000 {\n"
        '\t\tdevice_type = "memory";\n\t\treg = <0x0 0x40000000 0x0 0x20000000>;\n\t};\n};\n'
    )
    board = subprocess.run(
        ["dtc", "-q", "-I", "dts", "-O", "dtb", "-"], input=dts.encode(), capture_output=True, check=True
    ).stdout
    out = tmp_path / "holes.dtb"
    out.write_bytes(with_holes(board, [(0x42000000, 0x43000000), (0x150000000, 0x150100000)]))

    def get(node: str, prop: str, kind: str = "x") -> str:
        return subprocess.run(
            ["fdtget", "-t", kind, str(out), node, prop], capture_output=True, text=True, check=True
        ).stdout.split()

    assert get("/reserved-memory", "#address-cells") == ["2"]
    assert get("/reserved-memory", "#size-cells") == ["2"]
    assert get("/reserved-memory/testbench-hole@42000000", "reg") == ["0", "42000000", "0", "1000000"]
    assert get("/reserved-memory/testbench-hole@150000000", "reg") == ["1", "50000000", "0", "100000"]
    listed = subprocess.run(
        ["fdtget", "-p", str(out), "/reserved-memory/testbench-hole@42000000"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert "no-map" in listed
    assert get("/memory@40000000", "reg") == ["0", "40000000", "0", "20000000"]  # the bank itself untouched
