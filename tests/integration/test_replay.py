"""`testbench replay`: any placement checked in seconds. Expected ranges from DOMAIN.md: Debian's zImage
inflates to I = 0x13a10b4 at RAM base + 0x208000 (DOMAIN 4, log C; 8.1), and its relocated decompressor
copy covers about +0x15A9900..+0x1ADAA60 above RAM base (8.3). The stage-2 payload is SHAKE-256 of
"testbench-payload-<seed>" (README of initramfs.py: any tool can regenerate it), recomputed here."""

import argparse
import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from testbench.cli import main
from testbench.replay import ReplayRequest, replay
from testbench.replay_cli import request_from_args

SEED_B = Path(__file__).parents[1] / "unit" / "data" / "seed_b.txt"
KERNEL_END = 0x208000 + 0x13A10B4  # RAM-base relative end of the inflated Debian kernel


def _args(tmp_path: Path, **kw) -> ReplayRequest:
    base = dict(
        machine="virt",
        ram=None,
        kernel="debian",
        initrd=None,
        initrd_size=None,
        seed=1,
        dtb=None,
        kernel_at=None,
        initrd_at=None,
        dtb_at=None,
        from_log=None,
        until=None,
        decompress_deadline=None,
        no_halt_check=False,
        out=str(tmp_path / "replay"),
    )
    return request_from_args(argparse.Namespace(**(base | kw)))


@pytest.fixture
def initrd_file(tmp_path: Path) -> Path:
    path = tmp_path / "initrd.bin"
    path.write_bytes(bytes(range(251)) * 4200)  # ~1 MiB, no long runs of equal bytes
    return path


def _payload_sha256(size: int, seed: int = 1) -> str:
    return hashlib.sha256(hashlib.shake_256(b"testbench-payload-%d" % seed).digest(size)).hexdigest()


def _chosen(dtb: Path, prop: str) -> str:
    return subprocess.run(
        ["fdtget", "-t", "x", str(dtb), "/chosen", prop], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_seed_log_b_on_vexpress_a15(images, tmp_path):
    result = replay(_args(tmp_path, machine="vexpress-a15", from_log=str(SEED_B), until="kernel-entry"))
    base = 0x80000000
    # Log B: RAM at 0x10000000, Kernel 0x10008000, Initrd 0x11510000 size 0x53f46a, DT 0x11a50000 (DOMAIN 4).
    assert {r: p["address"] - base for r, p in result["placement"].items()} == {
        "kernel": 0x8000,
        "initrd": 0x1510000,
        "dtb": 0x1A50000,
    }
    # The stand-in initrd is a generated stage-2 one of exactly the log's size.
    assert result["placement"]["initrd"]["size"] == 0x53F46A
    assert result["expected"]["payload_sha256"] is not None
    initrd = [c for c in result["observed"]["clobbered"] if c["segment"] == "initrd"]
    # The inflated kernel itself runs over the initrd: from its first byte up to the kernel's end.
    assert initrd[0]["offset"] == 0 and initrd[0]["end_offset"] >= KERNEL_END - 0x1510000 - 64
    assert result["verdict"] == "fail" and result["oracle_agrees"] is True, result["oracle_difference"]


def test_safe_layout_with_a_stage2_initrd_boots_to_init(images, tmp_path):
    result = replay(_args(tmp_path, kernel_at="+0x8000", initrd_size="1M", initrd_at="+0x2008000", dtb_at="+0x2800000"))
    assert result["until"] == "init"
    assert result["verdict"] == "pass" and result["phase"] == "init", result["reasons"]
    stage2 = result["stage2"]
    assert stage2["payload_sha256"] == _payload_sha256(1 << 20) and stage2["payload_size"] == 1 << 20
    # The DTB the second kernel exposes is byte for byte the one the bench patched and loaded.
    dtb = tmp_path / "replay" / "replay.dtb"
    assert stage2["fdt_sha256"] == hashlib.sha256(dtb.read_bytes()).hexdigest()
    assert stage2["cmdline"] == "console=ttyAMA0 earlycon=pl011,0x09000000 panic=-1"
    initrd = result["placement"]["initrd"]
    assert _chosen(dtb, "linux,initrd-start") == f"{0x40000000 + 0x2008000:x}"
    assert _chosen(dtb, "linux,initrd-end") == f"{0x40000000 + 0x2008000 + initrd['size']:x}"
    assert result["observed"]["clobbered"] == [] and result["oracle_agrees"] is True


def test_colliding_layout_with_a_stage2_initrd_fails_in_the_kernel(images, tmp_path):
    # The initrd inside the relocated decompressor copy (+0x15A9900..+0x1ADAA60), clear of the kernel.
    result = replay(_args(tmp_path, kernel_at="+0x8000", initrd_size="1M", initrd_at="+0x1700000", dtb_at="+0x2800000"))
    assert result["verdict"] == "fail" and result["phase"] == "kernel", result["reasons"]
    clobbered = result["observed"]["clobbered"]
    assert [c["segment"] for c in clobbered] == ["initrd"] and clobbered[0]["offset"] == 0
    assert result["stage2"] is None
    assert any("Initramfs unpacking failed" in r for r in result["reasons"]), result["reasons"]
    assert result["oracle_agrees"] is True, result["oracle_difference"]
    svg = (tmp_path / "replay" / "layout.svg").read_text()
    start = 0x40000000 + 0x1700000
    assert f"observed: initrd clobbered [{start:#x}, {start + result['placement']['initrd']['size']:#x})" in svg


def test_vexpress_board_dtb_gets_the_ram_size(images, tmp_path):
    # A board DTB says 1 GiB at 0x80000000; with 512 MiB the bench must make /memory say so.
    result = replay(
        _args(
            tmp_path,
            machine="vexpress-a15",
            ram="512M",
            kernel_at="+0x8000",
            initrd_size="64K",
            initrd_at="+0x2008000",
            dtb_at="+0x2800000",
        )
    )
    assert result["verdict"] == "pass", result["reasons"]
    assert result["stage2"]["iomem_ram"] == ["80000000-9fffffff"]


def test_hand_chosen_colliding_layout(images, tmp_path):
    # DOMAIN 8.3, virt small initrd with no initrd: the DTB at +0x19c5000 sits inside the relocated copy.
    result = replay(_args(tmp_path, kernel_at="+0x8000", dtb_at="+0x19c5000"))
    assert [c["segment"] for c in result["observed"]["clobbered"]] == ["dtb"]
    assert result["observed"]["clobbered"][0]["offset"] == 0
    assert result["verdict"] == "fail" and result["oracle_agrees"] is True, result["oracle_difference"]


def test_hand_chosen_safe_layout(images, tmp_path, initrd_file):
    result = replay(
        _args(tmp_path, kernel_at="+0x8000", initrd=str(initrd_file), initrd_at="+0x2008000", dtb_at="+0x2200000")
    )
    assert result["observed"]["clobbered"] == []
    assert result["verdict"] == "pass", result["reasons"]
    assert result["oracle_agrees"] is True
    stops = {s["name"]: s for s in result["observed"]["stops"]}
    assert stops["kernel"]["pc"] == 0x40000000 + 0x208000 and stops["kernel"]["r2"] == 0x40000000 + 0x2200000
    on_disk = json.loads((tmp_path / "replay" / "result.json").read_text())
    assert on_disk["verdict"] == "pass"


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--kernel-at", "0x10000000", "--dtb-at", "+0x100000"], "outside RAM"),
        (
            ["--kernel-at", "+0x8000", "--dtb-at", "+0x2800000", "--initrd-size", "1M"],
            "--initrd-size needs --initrd-at",
        ),
        (["--kernel-at", "+0x8000", "--dtb-at", "+0x2800000", "--decompress-deadline", "0"], "positive number"),
    ],
)
def test_bad_replay_input_is_one_line(images, tmp_path, capsys, extra, says):
    rc = main(["replay", "--machine", "virt", *extra, "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and says in err, err
