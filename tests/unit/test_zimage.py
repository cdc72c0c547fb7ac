"""zImage reader: synthetic images built from DOMAIN.md's layout, and every cached Debian armmp zImage."""

from __future__ import annotations

import gzip
import struct

import pytest
from debian_kernel import facts_for

from testbench.errors import UserError
from testbench.inputs.zimage import ZImageError, parse_zimage, read_zimage

# ZImage fields pinned per build in kernel_facts.toml (measured with od there, not with this reader).
EXACT_FIELDS = (
    "size",
    "table_offset",
    "tag_words",
    "size_ptr",
    "inflated_size",
    "kernel_bss",
    "text_offset",
    "malloc_size",
    "restart",
    "reloc_pad",
    "decompressor_bss",
    "bss_end",
    "stack_end",
)


def test_debian_armmp_constants(kernel_tree):
    facts = facts_for(kernel_tree.zimage)
    if facts is None:
        pytest.skip(
            f"zImage sha256 {kernel_tree.sha256} ({kernel_tree.release}) is not in kernel_facts.toml; "
            "test_kernel_facts.py still checks it against its package"
        )
    z = read_zimage(kernel_tree.zimage)
    assert {f: getattr(z, f) for f in EXACT_FIELDS} == {f: facts[f] for f in EXACT_FIELDS}, facts["package"]
    if "wont_overwrite" in facts:  # pinned for the builds measured since the appended-DTB audit
        assert z.wont_overwrite == facts["wont_overwrite"], facts["package"]
        # DOMAIN 9.3: 0x174 bytes between restart and wont_overwrite in Debian's 6.1 and 6.12 (5.10: 0x190)
        assert z.wont_overwrite - z.restart == (0x190 if facts["version"].startswith("5.10") else 0x174)
    assert z.file_size == facts["file_size"]
    assert z.efi_stub and not z.thumb2 and z.endian == "le"
    assert z.appended_dtb_size is None


@pytest.mark.parametrize("words", [2, 3, 4, 5, 6])
def test_tag_size_words(make_zimage, words):
    z = parse_zimage(make_zimage(tag_words=words, inflated=0xB78080, kbss=0x3D3C0))
    assert z.tag_words == words
    # kexec-tools reads +8/+12 whatever the size word says (a size of 2 covers only the header)
    assert z.inflated_size == 0xB78080
    assert z.kernel_bss == 0x3D3C0
    assert z.text_offset == (0x208000 if words >= 5 else None)
    assert z.malloc_size == (0x10000 if words >= 6 else None)


def test_unaligned_size_ptr(make_zimage):
    raw = make_zimage(z=0x9000, inflated=0x01020304)
    z = parse_zimage(raw)
    assert z.size_ptr % 4 != 0
    assert raw[z.size_ptr : z.size_ptr + 4] == bytes([4, 3, 2, 1])
    assert z.inflated_size == 0x01020304


@pytest.mark.parametrize("layout", ["new", "old"])
def test_decompressor_constants_scanned(make_zimage, layout):
    z = parse_zimage(make_zimage(z=0x8000, restart=0xC4, pad=0xB00, dbss=0x2A4, lc0_layout=layout))
    assert z.restart == 0xC4
    assert z.reloc_pad == 0xB00
    assert z.bss_start == 0x8000
    assert z.bss_end == 0x8000 + 0x2A4
    assert z.stack_end == ((0x8000 + 0x2A4 + 7) & ~7) + 4096


def test_thumb2_reports_unknown_pad(make_zimage):
    z = parse_zimage(make_zimage(thumb2=True))
    assert z.thumb2
    assert z.reloc_pad is None
    assert any("Thumb-2" in n for n in z.notes)


def test_no_table_is_pre_4_15(make_zimage):
    raw = bytearray(make_zimage())
    struct.pack_into("<I", raw, 0x34, 0)
    z = parse_zimage(bytes(raw))
    assert z.inflated_size is None and z.kernel_bss is None and not z.has_tag


def test_efi_stub_and_appended_dtb(make_zimage):
    z = parse_zimage(make_zimage(efi=True, appended_dtb=0x3000))
    assert z.efi_stub
    assert z.appended_dtb_size == 0x3000
    assert z.size == 0x8000  # Z = end - start excludes the DTB
    assert z.data_size == 0xB000


def test_uimage_wrapper(make_zimage):
    inner = make_zimage()
    hdr = struct.pack(">7I", 0x27051956, 0, 0, len(inner), 0x40008000, 0x40008000, 0) + bytes(36)
    z = parse_zimage(hdr + inner)
    assert z.container == "uimage"
    assert z.inflated_size == 0x123457


def test_gzip_wrapper(make_zimage):
    z = parse_zimage(gzip.compress(make_zimage()))
    assert z.container == "gzip"
    assert z.kernel_bss == 0x5E4D4


@pytest.mark.parametrize("raw", [b"", b"\0" * 100, b"\x1f\x8bnot gzip", bytes(0x24) + b"\x18\x28\x6f\x01" + bytes(8)])
def test_bad_input_raises_zimage_error(raw):
    with pytest.raises(ZImageError):
        parse_zimage(raw)


def test_truncated_header_size(make_zimage):
    with pytest.raises(ZImageError, match="file has"):
        parse_zimage(make_zimage()[:0x4000])


def test_missing_file_is_user_error(tmp_path):
    with pytest.raises(UserError):
        read_zimage(tmp_path / "nope")
