"""The boards at the seed reports' RAM bases, and SMP, in real QEMU: midway (RAM at 0x0, as Clearfog) and
sabrelite (0x10000000, as i.MX6 boards) with their share in the stage-1 initramfs (no virtio in QEMU 7.2),
virt with two CPUs, vexpress-a15 with two CPUs (no CPU hotplug: kexec_load refused), and seed log B's two
layouts replayed on the two boards.

Expected values by hand: with --image-size=0x2000000 kexec-tools puts the kernel at RAM base + 0x8000 and
the initrd at kernel + 0x2000000 (DOMAIN 3.1); Debian's zImage has TEXT_OFFSET 0x208000 and inflates to
about 0x13a1000 (DOMAIN 9.1), so at base 0x0 the kernel is entered at 0x208000 and ends near 0x15a9000;
seed log B's addresses are in DOMAIN 4 and the thread (tests/unit/data)."""

import argparse
import json
import re
from pathlib import Path

from testbench.case import CaseRequest, run_case
from testbench.emulator.qemu import qemu_version
from testbench.machines import get_machine
from testbench.prepare import prepare_case
from testbench.replay import replay
from testbench.replay_cli import request_from_args

DATA = Path(__file__).parents[1] / "unit" / "data"
IMAGE_SIZE = ("--image-size=0x2000000",)
TEXT_OFFSET = 0x208000
INFLATED_AT_LEAST = 0x1390000  # Debian 6.1's inflated kernel, every 6.1.0-x build so far (DOMAIN 8.1, 9.1)


def _run(images, out: Path, machine: str, smp: int = 1, **options):
    m = get_machine(machine).with_smp(smp)
    return run_case(prepare_case(CaseRequest(machine=m, ram=1 << 30, out=out, **options), images))


def _on_disk(result) -> dict:
    return json.loads((result.request.out / "result.json").read_text())


def _share(machine: str) -> str:
    """QEMU 7.2's sabrelite and every midway have no virtio: the initramfs; QEMU >= 9 gave the i.MX6 PCIe."""
    return "virtio-9p-pci" if machine == "sabrelite" and qemu_version()[:2] >= (9, 0) else "initramfs"


def _board_fails_by_default_and_passes_with_image_size(images, tmp_path: Path, machine: str, base: int) -> None:
    good = _run(images, tmp_path / "imagesize", machine, kexec_args=IMAGE_SIZE)
    assert (good.verdict.verdict, good.verdict.phase) == ("pass", "init"), good.verdict.reasons
    assert good.load["kernel"]["address"] == base + 0x8000
    assert good.load["initrd"]["address"] == base + 0x8000 + 0x2000000
    stops = {s["name"]: s for s in good.observed["stops"]}
    assert stops["kernel"]["pc"] == base + TEXT_OFFSET and all(s["mmu_off"] for s in stops.values())
    assert good.observed["clobbered"] == [] and good.oracle["agrees"], good.oracle
    record = _on_disk(good)
    assert record["ram"]["base"] == base and record["oracle_agrees"] is True
    assert record["stage1"]["share"] == _share(machine)
    # What the guest wrote reached the host (over the console for the initramfs): RAM from the board's base.
    iomem = (good.request.out / "iomem.txt").read_text()
    assert re.search(rf"^{base:08x}-[0-9a-f]+ : System RAM$", iomem, re.MULTILINE), iomem
    assert record["stage2"]["cpus_online"] == "0"

    bad = _run(images, tmp_path / "default", machine)
    assert bad.verdict.verdict == "fail", bad.verdict.reasons
    assert bad.stage1 is not None
    if _share(machine) == "initramfs":  # the same files: the same stage-1 initramfs, the same snapshot
        assert bad.stage1.source == "snapshot"
    assert bad.load["kernel"]["address"] == base + 0x8000
    # The relocated decompressor lands above the inflated kernel, on the initrd kexec put right after the
    # zImage's (too small) reservation: it is overwritten from its first byte.
    initrd = [c for c in bad.observed["clobbered"] if c["segment"] == "initrd"]
    assert initrd and initrd[0]["offset"] == 0
    assert initrd[0]["start"] >= base + TEXT_OFFSET + INFLATED_AT_LEAST - 0x400000
    assert _on_disk(bad)["oracle_agrees"] is True, bad.oracle


def test_midway_ram_at_zero(images, tmp_path):
    _board_fails_by_default_and_passes_with_image_size(images, tmp_path, "midway", 0x0)


def test_sabrelite_ram_at_0x10000000(images, tmp_path):
    _board_fails_by_default_and_passes_with_image_size(images, tmp_path, "sabrelite", 0x10000000)


def test_virt_with_two_cpus_hands_over_and_brings_both_up_again(images, tmp_path):
    result = _run(images, tmp_path / "smp", "virt", smp=2, kexec_args=IMAGE_SIZE)
    assert (result.verdict.verdict, result.verdict.phase) == ("pass", "init"), result.verdict.reasons
    record = _on_disk(result)
    assert record["smp"] == 2
    assert (record["stage2"]["cpus_online"], record["stage2"]["cpus_possible"]) == ("0-1", "0-1")
    assert "CPU1 killed." in (result.request.out / "console.log").read_text()  # PSCI took CPU 1 offline
    cpus = json.loads((Path(result.observed["dumps"]) / "cpus.json").read_text())
    assert cpus["vcpus"] == [1, 2] and cpus["zimage_entry"] == cpus["kernel_entry"]
    assert list(cpus["others_at_zimage_entry"]) == [str(3 - cpus["zimage_entry"])]


def test_vexpress_a15_with_two_cpus_cannot_kexec(images, tmp_path):
    result = _run(images, tmp_path / "smp", "vexpress-a15", smp=2, kexec_args=IMAGE_SIZE)
    assert (result.verdict.verdict, result.verdict.phase) == ("fail", "load")
    assert result.verdict.reasons[0].startswith("a CPU cannot be taken offline: 2 CPUs possible (0-1)")
    assert "nr_cpus=1" in result.verdict.reasons[0]
    # With two QEMU CPUs the bench adds no nr_cpus: the refusal is the board's own.
    assert "nr_cpus" not in (result.request.out / "qemu.cmdline").read_text()


def _replay(tmp_path: Path, machine: str, log: Path, attempt: int | None = None, until: str | None = None) -> dict:
    args = dict(
        machine=machine,
        ram=None,
        kernel="debian",
        initrd=None,
        initrd_size=None,
        seed=1,
        dtb=None,
        kernel_at=None,
        initrd_at=None,
        dtb_at=None,
        from_log=str(log),
        attempt=attempt,
        until=until,
        decompress_deadline=None,
        no_halt_check=False,
        out=str(tmp_path / f"replay-{machine}"),
    )
    return replay(request_from_args(argparse.Namespace(**args)))


def test_seed_log_b_imx6_layout_on_sabrelite(images, tmp_path):
    # Log B on i.MX6: RAM 0x10000000, Kernel 0x10008000, Initrd 0x11510000 (0x53f46a), DT 0x11a50000.
    result = _replay(tmp_path, "sabrelite", DATA / "seed_b.txt", until="kernel-entry")
    assert {r: p["address"] for r, p in result["placement"].items()} == {
        "kernel": 0x10008000,
        "initrd": 0x11510000,
        "dtb": 0x11A50000,
    }
    # Debian's kernel (TEXT_OFFSET 0x208000) inflates over the initrd from its first byte.
    initrd = [c for c in result["observed"]["clobbered"] if c["segment"] == "initrd"]
    assert initrd[0]["offset"] == 0
    assert result["predicted"]["verdict"] == "collision"
    assert result["verdict"] == "fail" and result["oracle_agrees"] is True, result["oracle_difference"]


def test_seed_log_b_clearfog_layout_on_midway(images, tmp_path):
    # The thread's Clearfog attempt (RAM 0x0): Kernel 0x8000, DT 0x1511000, no initrd.
    result = _replay(tmp_path, "midway", DATA / "thread_2020_a80.txt", attempt=6)
    assert result["ram"]["base"] == 0 and result["until"] == "kernel-entry"
    assert {r: p["address"] for r, p in result["placement"].items()} == {"kernel": 0x8000, "dtb": 0x1511000}
    stops = {s["name"]: s for s in result["observed"]["stops"]}
    assert stops["kernel"]["reached"] and stops["kernel"]["pc"] == TEXT_OFFSET  # base 0 + TEXT_OFFSET
    # The inflated kernel runs from 0x208000 past 0x1511000: the DTB is gone from its first byte.
    dtb = [c for c in result["observed"]["clobbered"] if c["segment"] == "dtb"]
    assert dtb and dtb[0]["offset"] == 0
    assert result["predicted"]["verdict"] == "collision"
    assert result["verdict"] == "fail" and result["oracle_agrees"] is True, result["oracle_difference"]
