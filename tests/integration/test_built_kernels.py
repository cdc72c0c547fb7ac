"""Kernels built from source by scripts/build-kernel, booted as the SECOND kernel through the real loop.

Stage 1 is Debian's armmp kernel running Debian's kexec-tools 2.0.25 with its default placement; the built
zImage is what it kexecs into, with the emulator's ground truth on (`observe`). Expected values come from
the build's own records (System.map, the bare zImage and DTB files) and from DOMAIN.md:
* TEXT_OFFSET 0x8000 is what kexec-tools assumes (it hard-codes kernel_base = base + 0x8000, DOMAIN 3.1),
  so the decompressed kernel starts exactly where the zImage was loaded, and nothing is clobbered;
* kexec >= 2.0.17 reserves max(text+data+bss, text+data+zImage+0x11000) before the initrd (DOMAIN 3.2);
* kexec >= 2.0.13 loads only up to the header's _edata, so an appended DTB never reaches the guest and
  the decompressor uses kexec's DTB (DOMAIN 2.5).
A variant that is not built skips with the command that builds it.
"""

import hashlib
from pathlib import Path

import pytest

from testbench.inputs.images import built_dir

MIB = 1 << 20
TEXT_OFFSET = 0x8000  # arch/arm/Makefile textofs-y, the value these variants are configured to keep
PAGE = 0x1000


def _kernel(variant: str) -> Path:
    path = built_dir("kernels", variant)
    if not (path / "zImage").exists():
        pytest.skip(f"kernel variant {variant} is not built: run scripts/build-kernel {variant}")
    return path


def _system_map(path: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in (path / "System.map").read_text().splitlines():
        address, _, name = line.split()
        out.setdefault(name, int(address, 16))
    return out


def _stops(result) -> dict:
    return {s["name"]: s for s in result.observed["stops"]}


def _assert_clean_pass(result):
    assert result.verdict.verdict == "pass", result.verdict
    assert result.observed["clobbered"] == [], result.observed["clobbered"]
    assert not result.observed["fidelity"], result.observed["fidelity"]
    assert result.oracle["agrees"], result.oracle
    assert result.predicted["verdict"] == "safe", result.predicted


@pytest.mark.parametrize("machine", ["virt", "vexpress-a9", "vexpress-a15"])
def test_text8000_gzip_default_placement_is_safe(run_kexec_case, machine):
    path = _kernel("text8000-gzip")
    result = run_kexec_case(machine, kernel=path / "zImage", initrd_size=32 * MIB, observe=True)
    base = result.request.machine.ram_base
    stops = _stops(result)
    # The kernel entry is the load address itself: TEXT_OFFSET equals kexec's assumed 0x8000.
    assert stops["zimage"]["pc"] == base + 0x8000
    assert stops["kernel"]["pc"] == base + TEXT_OFFSET
    assert all(s["reached"] and s["mmu_off"] for s in stops.values()), stops
    assert stops["zimage"]["r2"] == result.load["dtb"]["address"]
    _assert_clean_pass(result)
    assert result.stage2["payload_size"] == 32 * MIB


def test_bigbss_initrd_placed_above_the_bss(run_kexec_case):
    path = _kernel("bigbss")
    smap = _system_map(path)
    image_and_bss = smap["_end"] - smap["_text"]  # what the kernel claims after boot (memblock)
    assert image_and_bss > 32 * MIB
    result = run_kexec_case("virt", kernel=path / "zImage", initrd_size=32 * MIB, observe=True)
    base = result.request.machine.ram_base
    # kexec read the bss from the tag and reserved it: the initrd starts above the kernel's _end.
    assert result.load["bss"] == smap["__bss_stop"] - smap["__bss_start"]
    assert result.load["initrd"]["address"] >= base + TEXT_OFFSET + image_and_bss
    _assert_clean_pass(result)


def test_appended_dtb_is_cut_off_by_kexec(run_kexec_case):
    path = _kernel("appended-dtb")
    bare = (path / "zImage.bare").stat().st_size
    dtb = (path / "appended.dtb").read_bytes()
    result = run_kexec_case("virt", kernel=path / "zImage", initrd_size=MIB, observe=True)
    # kexec saw the whole file but loads only up to _edata, plus the 4 zeroed bytes (memsz Z+4, page-rounded)
    assert result.load["file_size"] == bare + len(dtb)
    assert result.load["zimage_size"] == bare
    kseg = next(s for s in result.load["segments"] if s["mem"] == result.load["entry"])
    assert kseg["memsz"] == (bare + 4 + PAGE - 1) & -PAGE
    # The second kernel used kexec's DTB (the appended one is vexpress-a9's and has no initrd or bootargs):
    # the payload and the command line arrived, which the pass verdict checks, and /sys/firmware/fdt differs.
    _assert_clean_pass(result)
    assert result.stage2["fdt_sha256"] and result.stage2["fdt_sha256"] != hashlib.sha256(dtb).hexdigest()
