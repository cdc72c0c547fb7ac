"""testbench.inputs.zimage on the zImages scripts/build-kernel makes, checked against the build's own records.

The expected values never come from testbench code: they come from the kernel build itself, read with
the cross binutils (`arm-linux-gnueabihf-nm`/`readelf` on vmlinux and the decompressor ELF), from the
`.config` and from `System.map`. The linker script (arch/arm/boot/compressed/vmlinux.lds.S) names every
tag-table word after a symbol, so each word the parser reads has an independent twin:
    KLSZ +8  = __piggy_size_addr - _start      KLSZ +12 = _kernel_bss_size (= __bss_stop - __bss_start)
    KLSZ +16 = TEXT_OFFSET (= _text - PAGE_OFFSET)      hdr.end = _edata
Each variant skips with the command to run when it has not been built.
"""

import gzip
import io
import json
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from testbench.inputs.images import built_dir
from testbench.inputs.zimage import read_zimage

FRAGMENTS = Path(__file__).resolve().parents[2] / "images" / "kernels"
VARIANTS = sorted(p.stem for p in FRAGMENTS.glob("*.config") if p.stem != "base")
NM = "arm-linux-gnueabihf-nm"
READELF = "arm-linux-gnueabihf-readelf"
# Magic numbers of the compressed payload (.piggydata, starting at the decompressor's `input_data`).
PAYLOAD_MAGIC = {
    "gzip": b"\x1f\x8b\x08",
    "xz": b"\xfd7zXZ\x00",
    "lz4": b"\x02\x21\x4c\x18",  # the legacy lz4 frame the kernel's lz4 -l produces
    "lzma": b"\x5d\x00\x00",
    "lzo": b"\x89LZO",
}
FDT_MAGIC = 0xD00DFEED


def _built(variant: str) -> Path:
    path = built_dir("kernels", variant)
    if not (path / "meta.json").exists():
        pytest.skip(f"kernel variant {variant} is not built: run scripts/build-kernel {variant}")
    return path


def _scanned(path: Path):
    """The zImage as the scanner reads it, from bytes: read_zimage(path) would take the constants from the
    decompressor.elf beside it, and these tests would compare the ELF with itself."""
    return read_zimage((path / "zImage").read_bytes())


def _symbols(elf: Path) -> dict[str, int]:
    if shutil.which(NM) is None:
        pytest.skip(f"{NM} is not installed: run scripts/build-kernel (it installs binutils-arm-linux-gnueabihf)")
    out = subprocess.run([NM, str(elf)], capture_output=True, text=True, check=True).stdout
    symbols: dict[str, int] = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3:
            symbols.setdefault(parts[2], int(parts[0], 16))
    return symbols


def _section_end(elf: Path, name: str) -> int:
    out = subprocess.run([READELF, "-SW", str(elf)], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        fields = line.replace("[ ", "[").split()
        if len(fields) > 5 and fields[1] == name:
            return int(fields[3], 16) + int(fields[5], 16)
    raise AssertionError(f"no {name} section in {elf}")


def _config(path: Path) -> dict[str, str]:
    values = {}
    for line in (path / "config").read_text().splitlines():
        if line.startswith("CONFIG_"):
            key, _, value = line.partition("=")
            values[key] = value.strip('"')
    return values


def _system_map(path: Path) -> dict[str, int]:
    symbols: dict[str, int] = {}
    for line in (path / "System.map").read_text().splitlines():
        address, _, name = line.split()
        symbols.setdefault(name, int(address, 16))
    return symbols


@pytest.fixture(params=VARIANTS)
def built(request) -> Path:
    return _built(request.param)


def test_tag_table_words_match_the_decompressor_symbols(built):
    """Every word of the KLSZ record against the linker-script symbol it was made from."""
    zi = _scanned(built)
    dec = _symbols(built / "decompressor.elf")
    start = dec["_start"]
    assert zi.table_offset == dec["_table_start"] - start
    assert zi.tag_words == 6  # 6.1's vmlinux.lds.S: LONG(ZIMAGE_MAGIC(6))
    assert zi.size_ptr == dec["__piggy_size_addr"] - start
    assert zi.kernel_bss == dec["_kernel_bss_size"]
    assert zi.malloc_size == 0x10000  # MALLOC_SIZE in compressed/Makefile, DOMAIN 1.2
    assert zi.magic_end - zi.magic_start == dec["_edata"] - start


def test_text_offset_and_kernel_sizes_match_system_map(built):
    zi = _scanned(built)
    smap, config = _system_map(built), _config(built)
    page_offset = int(config["CONFIG_PAGE_OFFSET"], 16)
    assert zi.text_offset == smap["_text"] - page_offset
    # The design of these variants: no MESON/MSM/IPQ40XX/AXXIA, so arch/arm/Makefile's textofs-y stands.
    assert zi.text_offset == 0x8000
    # The inflated Image is vmlinux from _text to _edata (objcopy -O binary); the bss follows it.
    assert zi.inflated_size == smap["_edata"] - smap["_text"]
    assert zi.kernel_bss == smap["__bss_stop"] - smap["__bss_start"]


def test_scanned_decompressor_constants_equal_the_elf_symbols(built):
    """The constants the oracle uses when it has only the zImage (a kernel without its decompressor.elf)."""
    zi = _scanned(built)
    elf = built / "decompressor.elf"
    dec = _symbols(elf)
    start = dec["_start"]
    assert not zi.thumb2 and not zi.efi_stub
    assert zi.restart == dec["restart"] - start
    assert zi.reloc_pad == (dec["reloc_code_end"] - dec["restart"] + 256) & ~255  # head.S, DOMAIN 2.3
    assert zi.bss_start == dec["__bss_start"] - start
    assert zi.bss_end == dec["_end"] - start
    assert zi.stack_end == _section_end(elf, ".stack") - start


def test_payload_compression_is_the_configured_one(built):
    """The compressed kernel really is what .config chose (and what meta.json says)."""
    config = _config(built)
    chosen = [name for name in PAYLOAD_MAGIC if config.get(f"CONFIG_KERNEL_{name.upper()}") == "y"]
    assert len(chosen) == 1, chosen
    meta = json.loads((built / "meta.json").read_text())
    assert meta["compression"] == chosen[0]
    dec = _symbols(built / "decompressor.elf")
    data = (built / "zImage").read_bytes()
    at = dec["input_data"] - dec["_start"]
    assert data[at : at + len(PAYLOAD_MAGIC[chosen[0]])] == PAYLOAD_MAGIC[chosen[0]]
    if chosen[0] == "gzip":
        # gzip's own trailer holds the inflated size (ISIZE), which is the word size_ptr points at
        end = dec["input_data_end"] - dec["_start"]
        with gzip.GzipFile(fileobj=io.BytesIO(data[at:end])) as gz:
            inflated = len(gz.read())
        assert read_zimage(data).inflated_size == inflated


def test_meta_records_the_build():
    for variant in VARIANTS:
        path = built_dir("kernels", variant)
        if not (path / "meta.json").exists():
            continue
        meta = json.loads((path / "meta.json").read_text())
        assert meta["variant"] == variant
        assert path.resolve().name == f"{variant}-{meta['hash'][:12]}"
        assert meta["text_offset"] == _system_map(path)["_text"] - int(_config(path)["CONFIG_PAGE_OFFSET"], 16)
        assert meta["build_seconds"] > 0


def test_appended_dtb_is_seen_and_excluded_from_z():
    path = _built("appended-dtb")
    raw = (path / "zImage").read_bytes()
    bare = (path / "zImage.bare").read_bytes()
    dtb = (path / "appended.dtb").read_bytes()
    assert raw == bare + dtb
    assert struct.unpack(">I", dtb[:4])[0] == FDT_MAGIC
    zi = read_zimage(raw)
    assert zi.appended_dtb_size == struct.unpack(">I", dtb[4:8])[0] == len(dtb)
    dec = _symbols(path / "decompressor.elf")
    assert zi.size == dec["_edata"] - dec["_start"] == len(bare)  # the bare file ends at _edata
    assert zi.file_size == len(bare) + len(dtb)
    assert _config(path).get("CONFIG_ARM_APPENDED_DTB") == "y"


def test_bigbss_holds_the_log_buffer():
    path = _built("bigbss")
    config, smap = _config(path), _system_map(path)
    log_buf = 1 << int(config["CONFIG_LOG_BUF_SHIFT"])
    assert log_buf == 32 << 20
    zi = _scanned(path)
    assert smap["__bss_start"] <= smap["__log_buf"] < smap["__bss_stop"]
    assert zi.kernel_bss >= log_buf
    # Against the base: the image barely changes, the bss grows by at least the buffer.
    base = _scanned(_built("text8000-gzip"))
    assert zi.kernel_bss - base.kernel_bss >= log_buf - (1 << 17)


def test_strict_kernel_rwx_pads_the_image():
    """STRICT_KERNEL_RWX aligns the text/rodata/init boundaries to 1 MiB sections (DOMAIN 5)."""
    on = _built("rwx-on")
    off = _built("text8000-gzip")
    assert _config(on).get("CONFIG_STRICT_KERNEL_RWX") == "y"
    assert _config(off).get("CONFIG_STRICT_KERNEL_RWX") is None
    smap = _system_map(on)
    assert smap["__init_begin"] % (1 << 20) == 0
    zi_on, zi_off = _scanned(on), _scanned(off)
    assert zi_on.inflated_size > zi_off.inflated_size
