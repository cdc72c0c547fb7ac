"""`testbench replay`: any placement checked in seconds. Expected ranges from DOMAIN.md: Debian's zImage
inflates to I = 0x13a10b4 at RAM base + 0x208000 (DOMAIN 4, log C; 8.1), and its relocated decompressor
copy covers about +0x15A9900..+0x1ADAA60 above RAM base (8.3)."""

import argparse
import json
from pathlib import Path

import pytest

from testbench.cli import main
from testbench.replay import replay

SEED_B = Path(__file__).parents[1] / "unit" / "data" / "seed_b.txt"
KERNEL_END = 0x208000 + 0x13A10B4  # RAM-base relative end of the inflated Debian kernel


def _args(tmp_path: Path, **kw) -> argparse.Namespace:
    base = dict(machine="virt", ram=None, kernel="debian", initrd=None, dtb=None, kernel_at=None,
                initrd_at=None, dtb_at=None, from_log=None, out=str(tmp_path / "replay"))
    return argparse.Namespace(**(base | kw))


@pytest.fixture
def initrd_file(tmp_path: Path) -> Path:
    path = tmp_path / "initrd.bin"
    path.write_bytes(bytes(range(251)) * 4200)  # ~1 MiB, no long runs of equal bytes
    return path


def test_seed_log_b_on_vexpress_a15(images, tmp_path):
    result = replay(_args(tmp_path, machine="vexpress-a15", from_log=str(SEED_B)))
    base = 0x80000000
    # Log B: RAM at 0x10000000, Kernel 0x10008000, Initrd 0x11510000, DT 0x11a50000 (DOMAIN 4).
    assert {r: p["address"] - base for r, p in result["placement"].items()} == \
        {"kernel": 0x8000, "initrd": 0x1510000, "dtb": 0x1A50000}
    initrd = [c for c in result["observed"]["clobbered"] if c["segment"] == "initrd"]
    # The inflated kernel itself runs over the initrd: from its first byte up to the kernel's end.
    assert initrd[0]["offset"] == 0 and initrd[0]["end_offset"] >= KERNEL_END - 0x1510000 - 64
    assert result["verdict"] == "fail" and result["oracle_agrees"] is True, result["oracle_difference"]
    assert result["timings"]["replay"] < 60


def test_hand_chosen_colliding_layout(images, tmp_path):
    # DOMAIN 8.3, virt small initrd with no initrd: the DTB at +0x19c5000 sits inside the relocated copy.
    result = replay(_args(tmp_path, kernel_at="+0x8000", dtb_at="+0x19c5000"))
    assert [c["segment"] for c in result["observed"]["clobbered"]] == ["dtb"]
    assert result["observed"]["clobbered"][0]["offset"] == 0
    assert result["verdict"] == "fail" and result["oracle_agrees"] is True, result["oracle_difference"]


def test_hand_chosen_safe_layout(images, tmp_path, initrd_file):
    result = replay(_args(tmp_path, kernel_at="+0x8000", initrd=str(initrd_file), initrd_at="+0x2008000",
                          dtb_at="+0x2200000"))
    assert result["observed"]["clobbered"] == []
    assert result["verdict"] == "pass", result["reasons"]
    assert result["oracle_agrees"] is True
    stops = {s["name"]: s for s in result["observed"]["stops"]}
    assert stops["kernel"]["pc"] == 0x40000000 + 0x208000 and stops["kernel"]["r2"] == 0x40000000 + 0x2200000
    on_disk = json.loads((tmp_path / "replay" / "result.json").read_text())
    assert on_disk["verdict"] == "pass"


def test_bad_replay_input_is_one_line(images, tmp_path, capsys):
    rc = main(["replay", "--machine", "virt", "--kernel-at", "0x10000000", "--dtb-at", "+0x100000",
               "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "outside RAM" in err, err
