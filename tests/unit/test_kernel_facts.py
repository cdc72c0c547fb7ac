"""The zImage reader against what each cached Debian kernel package says about itself, for any build.

Expected values come from sources testbench.inputs.zimage never reads (debian_kernel.py explains each): the
compressed payload decoded with the standard library (where it ends is where size_ptr must point, its
length is the inflated size), the Image's own __bss_start/__bss_stop literal, the package's config
(TEXT_OFFSET by arch/arm/Makefile's rules, EFI stub, Thumb-2, endianness) and, when the -dbg package's
System.map is in the cache, its section symbols. kernel_facts.toml is checked against its own
measurements here too, so a slip in the table cannot pass for a fact.
"""

from __future__ import annotations

import json
from pathlib import Path

import debian_kernel
import pytest
from debian_kernel import (
    MALLOC_SIZE,
    KernelTree,
    PackageFacts,
    align_up,
    default_kernel_tree,
    find_kernel_trees,
    kexec_2_0_17_layout,
    load_facts,
    package_facts,
    read_system_map,
    text_offset_from_config,
)

from testbench.inputs.zimage import read_zimage

VIRT_RAM = 0x40000000
MiB = 1 << 20
DEBIAN_PAGE_OFFSET = 0xC0000000  # CONFIG_PAGE_OFFSET (VMSPLIT_3G) in every armmp config of the table


# --- the facts table, checked against itself -------------------------------------------------------------


@pytest.mark.parametrize("sha", sorted(load_facts()), ids=lambda sha: load_facts()[sha]["release"])
def test_facts_entry_agrees_with_its_system_map(sha):
    f = load_facts()[sha]
    m = f["system_map"]
    assert f["inflated_size"] == m["_edata"] - m["_text"]  # Image = _text .. _edata, no rounding
    assert f["kernel_bss"] == m["__bss_stop"] - m["__bss_start"]  # KBSS_SZ
    assert m["__bss_start"] == m["_edata"] and m["_end"] == m["__bss_stop"]
    assert f["text_offset"] == m["_text"] - DEBIAN_PAGE_OFFSET
    assert f["malloc_size"] == MALLOC_SIZE
    assert f["size"] == f["file_size"]  # Debian appends no DTB
    assert f["table_offset"] < f["size_ptr"] < f["size"]
    assert f["decompressor_bss"] == f["bss_end"] - f["size"]  # decompressor __bss_start == _edata == Z
    assert f["stack_end"] == align_up(f["bss_end"], 8) + 4096


@pytest.mark.parametrize("sha", sorted(load_facts()), ids=lambda sha: load_facts()[sha]["release"])
def test_facts_entry_oracle_numbers_follow_from_its_measurements(sha):
    f = load_facts()[sha]
    got = kexec_2_0_17_layout(
        VIRT_RAM,
        MiB,
        size=f["size"],
        inflated=f["inflated_size"],
        kernel_bss=f["kernel_bss"],
        text_offset=f["text_offset"],
        restart=f["restart"],
        reloc_pad=f["reloc_pad"],
        stack_end=f["stack_end"],
    )
    want = f["virt_2_0_25"]
    assert {k: got[k] for k in want} == {k: tuple(v) if isinstance(v, list) else v for k, v in want.items()}


def test_layout_reproduces_domain_log_c():
    # DOMAIN 4, log C (Debian 6.1.0-50, worked there by hand): ksize 0x18E42B4, initrd 0x418ED000, the copy
    # at 0x415A9900-0x41ADAA60, the footprint ending at 0x41AEBE78, the kernel's bss at 0x41607588.
    got = kexec_2_0_17_layout(
        VIRT_RAM,
        MiB,
        size=0x532200,
        inflated=0x13A10B4,
        kernel_bss=0x5E4D4,
        text_offset=0x208000,
        restart=0x10B4,
        reloc_pad=0x900,
        stack_end=0x533618,
    )
    assert (got["image_size"], got["initrd"], got["copy"], got["malloc_end"], got["kernel_bss_end"]) == (
        0x18E42B4,
        0x418ED000,
        (0x415A9900, 0x41ADAA60),
        0x41AEBE78,
        0x41607588,
    )


# --- the reader against each cached package ----------------------------------------------------------------


def _package(tree: KernelTree) -> PackageFacts:
    if not tree.config.is_file():  # e.g. TESTBENCH_DEBIAN_ZIMAGE naming a bare zImage
        pytest.skip(f"no {tree.config.name} beside {tree.zimage}: not an unpacked linux-image package")
    return package_facts(tree.zimage)


def test_tag_words_match_the_payload(kernel_tree: KernelTree):
    pf = _package(kernel_tree)
    if pf.payload is None:
        pytest.skip(f"{pf.compression} payload: no standard-library decoder to check the tag against")
    z = read_zimage(kernel_tree.zimage)
    assert z.size == pf.size
    assert z.size_ptr == pf.size_ptr, f"the {pf.compression} stream ends at {pf.payload[1]:#x}"
    assert z.inflated_size == pf.inflated_size, "the decoded Image's length"
    assert z.kernel_bss == pf.kernel_bss, "__bss_stop - __bss_start in __mmap_switched_data"
    assert z.table_offset < pf.payload[0]  # the table sits in the decompressor, before .piggydata


def test_config_facts(kernel_tree: KernelTree):
    pf = _package(kernel_tree)
    z = read_zimage(kernel_tree.zimage)
    assert z.text_offset == pf.text_offset
    assert (z.efi_stub, z.thumb2, z.endian) == (pf.efi_stub, pf.thumb2, "be" if pf.big_endian else "le")
    if z.tag_words is not None and z.tag_words >= 6:
        assert z.malloc_size == MALLOC_SIZE
    assert (z.appended_dtb_size is None) == (pf.file_size == pf.size)


def test_tag_words_match_the_system_map(kernel_tree: KernelTree):
    pf = _package(kernel_tree)
    m = pf.system_map
    if m is None:
        pytest.skip(
            f"boot/System.map-{kernel_tree.release} is Debian's placeholder and no "
            f"linux-image-{kernel_tree.release}-dbg is unpacked in the cache"
        )
    z = read_zimage(kernel_tree.zimage)
    assert z.inflated_size == m["_edata"] - m["_text"]
    assert z.kernel_bss == m["__bss_stop"] - m["__bss_start"]
    assert z.text_offset == m["_text"] - pf.page_offset


def test_decompressor_constants_are_plausible(kernel_tree: KernelTree):
    # No second source in the package for these: only the layout (DOMAIN 2.4) and the ranges of 7.1.
    # Exact values for known builds: test_zimage.py::test_debian_armmp_constants.
    pf = _package(kernel_tree)
    z = read_zimage(kernel_tree.zimage)
    assert z.bss_start == pf.size
    assert z.stack_end == align_up(z.bss_end, 8) + 4096
    assert 0 < z.decompressor_bss <= 0x1000
    assert 0x24 < z.restart < 0x2000 and z.restart % 4 == 0
    assert 0x800 <= z.reloc_pad <= 0xC00 and z.reloc_pad % 256 == 0


# --- the helpers' own rules ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "enabled, textofs",
    [
        ((), 0x8000),
        (("ARCH_MESON",), 0x208000),
        (("ARCH_MSM8960",), 0x208000),
        (("SA1111",), 0x8000),
        (("ARCH_SA1100", "SA1111"), 0x208000),
        (("ARCH_REALTEK",), 0x108000),
        (("ARCH_REALTEK", "ARCH_MESON", "ARCH_AXXIA"), 0x308000),
    ],
)
def test_text_offset_rules(enabled, textofs):
    assert text_offset_from_config(dict.fromkeys(enabled, "y")) == textofs


def test_placeholder_system_map_is_not_a_map(tmp_path):
    path = tmp_path / "System.map-6.1.0-57-armmp"
    path.write_text("ffffffffffffffff B The real System.map is in the linux-image-<version>-dbg package\n")
    assert read_system_map(path) is None
    assert read_system_map(tmp_path / "absent") is None


def _fake_tree(cache: Path, key: str, release: str, body: bytes) -> Path:
    zimage = cache / "tree" / key / "boot" / f"vmlinuz-{release}"
    zimage.parent.mkdir(parents=True)
    zimage.write_bytes(body)
    return zimage


def test_kernel_discovery(tmp_path, monkeypatch):
    monkeypatch.setenv("TESTBENCH_CACHE", str(tmp_path))
    monkeypatch.delenv("TESTBENCH_DEBIAN_ZIMAGE", raising=False)
    monkeypatch.setattr(debian_kernel, "LEGACY_ZIMAGE_GLOB", str(tmp_path / "none" / "*"))
    assert find_kernel_trees() == [] and default_kernel_tree() is None
    bookworm = _fake_tree(tmp_path, "a" * 64, "6.1.0-57-armmp", b"bookworm")
    trixie = _fake_tree(tmp_path, "b" * 64, "6.12.118+deb13-armmp", b"trixie")
    _fake_tree(tmp_path, "c" * 64, "6.1.0-9-armmp", b"bookworm")  # the same zImage twice counts once
    assert [t.zimage for t in find_kernel_trees()] == [bookworm, trixie]
    assert default_kernel_tree().zimage == trixie  # no manifest: the newest release
    manifest = tmp_path / "suites" / "bookworm" / "manifest.json"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(
        json.dumps(
            {
                "kernel_package": "linux-image-6.1.0-57-armmp",
                "kernel_release": "6.1.0-57-armmp",
                "packages": [{"name": "linux-image-6.1.0-57-armmp", "tree": "a" * 64}],
            }
        )
    )
    assert default_kernel_tree().zimage == bookworm
    monkeypatch.setenv("TESTBENCH_DEBIAN_ZIMAGE", str(trixie))
    assert default_kernel_tree().zimage == trixie
