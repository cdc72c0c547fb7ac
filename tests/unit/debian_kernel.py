"""Debian armmp kernels in the image cache, and what their packages say about them without testbench.inputs.zimage.

The tests hold no number of one Debian build. For any armmp zImage in the cache they compare the reader
with sources it never looks at: the compressed payload itself (inflated here with the standard library),
the kernel's own bss literal in the inflated Image, the package's `config-<release>`, and a real
System.map when one is in the cache. Exact numbers of known builds live in kernel_facts.toml, keyed by
the zImage's sha256, so a point release swaps the kernel without breaking a test.

What the KLSZ tag words equal (kernel sources, checked on the five builds of kernel_facts.toml):
* inflated size (the le32 at size_ptr) = the byte size of arch/arm/boot/Image, appended by `size_append`
  (`*_with_size` compressors; gzip's own ISIZE trailer instead). Image is `objcopy -O binary vmlinux`,
  from `_text` to the end of `.data`, and vmlinux.lds.S puts `_edata` right there: I = _edata - _text,
  no rounding. size_ptr = `__piggy_size_addr` = end of the piggy data - 4.
* kernel bss = `_kernel_bss_size` = __bss_stop - __bss_start (compressed/Makefile KBSS_SZ, from nm); with
  BSS_SECTION(0, 0, 0) and no ARM_MPU, __bss_start = _edata and _end = __bss_stop.
* TEXT_OFFSET = _text - PAGE_OFFSET (vmlinux.lds.S: `. = PAGE_OFFSET + TEXT_OFFSET`), set by the textofs-y
  rules of arch/arm/Makefile from the enabled platforms.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import lzma
import os
import re
import struct
import tomllib
import zlib
from dataclasses import dataclass
from pathlib import Path

FACTS_FILE = Path(__file__).with_name("kernel_facts.toml")
LEGACY_ZIMAGE_GLOB = "/tmp/debs/k/boot/vmlinuz-*-armmp"
MALLOC_SIZE = 0x10000  # compressed/Makefile MALLOC_SIZE := 65536 (>= 5.10), the 6th KLSZ word
KEXEC_EXTRA = 0x11000  # kexec-tools >= 2.0.17: zImage + 4 KiB stack + 64 KiB malloc (DOMAIN 3.2)
PAGE = 0x1000

# arch/arm/Makefile (5.10 .. 6.12; later kernels fold the three QCOM entries into ARCH_QCOM_SMEM). Make
# assigns in this order and the last enabled line wins; the list is sorted by address on purpose.
TEXTOFS_RULES: tuple[tuple[tuple[str, ...], int], ...] = (
    (("PM_H1940",), 0x108000),  # gone in 6.x
    (("ARCH_REALTEK",), 0x108000),
    (("ARCH_SA1100", "SA1111"), 0x208000),  # ifeq ($(CONFIG_ARCH_SA1100),y) textofs-$(CONFIG_SA1111)
    (("ARCH_IPQ40XX",), 0x208000),
    (("ARCH_MSM8X60",), 0x208000),
    (("ARCH_MSM8960",), 0x208000),
    (("ARCH_QCOM_SMEM",), 0x208000),
    (("ARCH_MESON",), 0x208000),
    (("ARCH_AXXIA",), 0x308000),
)
COMPRESSORS = ("GZIP", "LZMA", "XZ", "LZO", "LZ4")


def cache_root() -> Path:
    env = os.environ.get("TESTBENCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "testbench"


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _version_key(release: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", release))


@dataclass(frozen=True)
class KernelTree:
    """One unpacked linux-image package: its zImage with `config-` and `System.map-` beside it in boot/."""

    zimage: Path

    @property
    def release(self) -> str:
        return self.zimage.name.removeprefix("vmlinuz-")

    @property
    def config(self) -> Path:
        return self.zimage.with_name(f"config-{self.release}")

    @property
    def system_map(self) -> Path:
        return self.zimage.with_name(f"System.map-{self.release}")

    @functools.cached_property
    def sha256(self) -> str:
        return sha256_file(self.zimage)


def find_kernel_trees(cache: Path | None = None) -> list[KernelTree]:
    """Every armmp zImage under the cache (tree/<sha256>/boot/..., whatever the suite), one per sha256,
    oldest release first."""
    cache = cache or cache_root()
    found = glob.glob(str(cache / "**" / "boot" / "vmlinuz-*-armmp"), recursive=True)
    found += glob.glob(LEGACY_ZIMAGE_GLOB)
    if os.environ.get("TESTBENCH_DEBIAN_ZIMAGE"):
        found.append(os.environ["TESTBENCH_DEBIAN_ZIMAGE"])
    trees: dict[str, KernelTree] = {}
    for path in sorted(set(found)):
        tree = KernelTree(Path(path))
        if tree.zimage.is_file():
            trees.setdefault(tree.sha256, tree)
    return sorted(trees.values(), key=lambda t: (_version_key(t.release), t.release))


def _manifest_zimage(cache: Path) -> Path | None:
    """The kernel the cache's bookworm manifest names (or a pre-suites manifest.json at the top)."""
    for manifest in (cache / "suites" / "bookworm" / "manifest.json", cache / "manifest.json"):
        try:
            data = json.loads(manifest.read_text())
            tree = next(p["tree"] for p in data["packages"] if p["name"] == data["kernel_package"])
            release = data["kernel_release"]
        except (OSError, ValueError, KeyError, TypeError, StopIteration):
            continue
        for root in (cache, manifest.parent):
            zimage = root / "tree" / tree / "boot" / f"vmlinuz-{release}"
            if zimage.is_file():
                return zimage
    return None


def default_kernel_tree(cache: Path | None = None) -> KernelTree | None:
    """TESTBENCH_DEBIAN_ZIMAGE, else the manifest's kernel, else the newest release in the cache."""
    cache = cache or cache_root()
    env = os.environ.get("TESTBENCH_DEBIAN_ZIMAGE")
    if env:
        return KernelTree(Path(env))
    named = _manifest_zimage(cache)
    if named is not None:
        return KernelTree(named)
    trees = find_kernel_trees(cache)
    return trees[-1] if trees else None


# --- kernel_facts.toml ---------------------------------------------------------------------------------


@functools.cache
def load_facts() -> dict[str, dict]:
    """sha256 of the zImage -> its measured facts."""
    return tomllib.loads(FACTS_FILE.read_text())["builds"]


def facts_zimage(sha: str):
    """A testbench ZImage holding exactly one build's od-measured numbers from kernel_facts.toml (no file
    needed, so tests of the oracle keep running when Debian replaces the cached kernel)."""
    from testbench.inputs.zimage import ZImage

    f = load_facts()[sha]
    return ZImage(
        file_size=f["file_size"],
        container="zimage",
        data_size=f["file_size"],
        magic_start=0,
        magic_end=f["size"],
        endian="le",
        efi_stub=True,
        thumb2=False,
        table_offset=f["table_offset"],
        tag_words=f["tag_words"],
        size_ptr=f["size_ptr"],
        inflated_size=f["inflated_size"],
        kernel_bss=f["kernel_bss"],
        text_offset=f["text_offset"],
        malloc_size=f["malloc_size"],
        restart=f["restart"],
        reloc_pad=f["reloc_pad"],
        bss_start=f["size"],
        bss_end=f["bss_end"],
        stack_end=f["stack_end"],
        wont_overwrite=f.get("wont_overwrite"),
    )


def facts_for(zimage: Path) -> dict | None:
    return load_facts().get(sha256_file(zimage))


# --- the package's config and System.map ---------------------------------------------------------------


def read_config(path: Path) -> dict[str, str]:
    """CONFIG_X=value lines, without the prefix; `# CONFIG_X is not set` lines are simply absent."""
    out = {}
    for line in path.read_text().splitlines():
        if line.startswith("CONFIG_") and "=" in line:
            key, _, value = line.partition("=")
            out[key.removeprefix("CONFIG_")] = value.strip('"')
    return out


def text_offset_from_config(config: dict[str, str]) -> int:
    textofs = 0x8000
    for symbols, value in TEXTOFS_RULES:
        if all(config.get(s) == "y" for s in symbols):
            textofs = value
    return textofs


def compression_from_config(config: dict[str, str]) -> str:
    chosen = [c for c in COMPRESSORS if config.get(f"KERNEL_{c}") == "y"]
    assert len(chosen) == 1, f"config selects {chosen or 'no'} kernel compression"
    return chosen[0]


SYSTEM_MAP_SYMBOLS = ("_text", "_edata", "__bss_start", "__bss_stop", "_end")


def read_system_map(path: Path) -> dict[str, int] | None:
    """The section symbols of a System.map; None for Debian's 83-byte placeholder (or no file)."""
    try:
        text = path.read_text()
    except OSError:
        return None
    found = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[2] in SYSTEM_MAP_SYMBOLS:
            found[parts[2]] = int(parts[0], 16)
    return found if set(found) == set(SYSTEM_MAP_SYMBOLS) else None


def real_system_map(tree: KernelTree, cache: Path | None = None) -> Path | None:
    """The tree's own System.map if it is real, else one from the -dbg package unpacked into the cache
    (usr/lib/debug/boot/System.map-<release>): linux-image-* ships only a placeholder."""
    if read_system_map(tree.system_map) is not None:
        return tree.system_map
    cache = cache or cache_root()
    for hit in sorted(
        glob.glob(
            str(cache / "tree" / "*" / "usr" / "lib" / "debug" / "boot" / f"System.map-{glob.escape(tree.release)}")
        )
    ):
        if read_system_map(Path(hit)) is not None:
            return Path(hit)
    return None


# --- the compressed payload and the inflated Image ------------------------------------------------------

_STREAM_MAGIC = {"XZ": b"\xfd7zXZ\x00", "GZIP": b"\x1f\x8b\x08", "LZMA": b"\x5d\x00\x00"}


def inflate_payload(raw: bytes, compression: str) -> tuple[int, int, bytes] | None:
    """(start, end, Image) of the first stream of that format in the file that decodes to its end; None for
    LZO/LZ4, which the standard library cannot decode. The decompressor's own code holds the format magic
    too (its header check), so candidates that do not decode are skipped."""
    magic = _STREAM_MAGIC.get(compression)
    if magic is None:
        return None
    at = raw.find(magic)
    while at != -1:
        if compression == "GZIP":
            dec = zlib.decompressobj(16 + zlib.MAX_WBITS)
            err: type[Exception] = zlib.error
        else:
            dec = lzma.LZMADecompressor(lzma.FORMAT_XZ if compression == "XZ" else lzma.FORMAT_ALONE)
            err = lzma.LZMAError
        try:
            image = dec.decompress(raw[at:])
            done = dec.eof
        except err:
            done = False
        if done:
            return at, len(raw) - len(dec.unused_data), image
        at = raw.find(magic, at + 1)
    return None


def bss_literal(image: bytes, kernel_start: int) -> tuple[int, int]:
    """(__bss_start, __bss_stop) as the kernel's head-common.S holds them for clearing its bss:
    __mmap_switched_data = {__bss_start, __bss_stop, init_thread_union + THREAD_START_SP, ...}, with
    __bss_start = _edata = kernel_start + len(Image). Exactly one such triple is accepted."""
    edata = kernel_start + len(image)
    hits = []
    at = image.find(struct.pack("<I", edata))
    while at != -1:
        if at % 4 == 0 and at + 12 <= len(image):
            start, stop, sp = struct.unpack_from("<3I", image, at)
            if start < stop <= start + (64 << 20) and kernel_start <= sp < start:
                hits.append((start, stop))
        at = image.find(struct.pack("<I", edata), at + 1)
    assert len(hits) == 1, f"__mmap_switched_data {{{edata:#x}, __bss_stop, sp}} found {len(hits)} times"
    return hits[0]


@dataclass(frozen=True)
class PackageFacts:
    """What the package says about its zImage, none of it read by testbench.inputs.zimage."""

    file_size: int
    size: int  # Z = end - start, header words 0x28/0x2c (DOMAIN 1.1)
    text_offset: int  # config's textofs rules
    page_offset: int
    compression: str
    efi_stub: bool
    thumb2: bool
    big_endian: bool
    payload: tuple[int, int] | None  # compressed stream [start, end) in the zImage
    size_ptr: int | None  # where the inflated size must be read: end of the piggy data - 4
    inflated_size: int | None  # len(Image) as decoded here
    kernel_bss: int | None  # __bss_stop - __bss_start from the Image's own literal
    system_map: dict[str, int] | None


@functools.cache
def package_facts(zimage: Path) -> PackageFacts:
    raw = zimage.read_bytes()
    tree = KernelTree(zimage)
    config = read_config(tree.config)
    text_offset = text_offset_from_config(config)
    page_offset = int(config["PAGE_OFFSET"], 16)
    compression = compression_from_config(config)
    start, end = struct.unpack_from("<2I", raw, 0x28)
    inflated = inflate_payload(raw, compression)
    size_ptr = inflated_size = kernel_bss = None
    payload = None
    if inflated is not None:
        first, last, image = inflated
        payload = (first, last)
        # gzip's ISIZE trailer is the size word; the other formats get it appended (size_append)
        size_ptr = last - 4 if compression == "GZIP" else last
        inflated_size = len(image)
        bss_start, bss_stop = bss_literal(image, page_offset + text_offset)
        kernel_bss = bss_stop - bss_start
    system_map = real_system_map(tree)
    return PackageFacts(
        file_size=len(raw),
        size=end - start,
        text_offset=text_offset,
        page_offset=page_offset,
        compression=compression,
        efi_stub=config.get("EFI_STUB") == "y",
        thumb2=config.get("THUMB2_KERNEL") == "y",
        big_endian=config.get("CPU_BIG_ENDIAN") == "y",
        payload=payload,
        size_ptr=size_ptr,
        inflated_size=inflated_size,
        kernel_bss=kernel_bss,
        system_map=read_system_map(system_map) if system_map else None,
    )


# --- kexec-tools >= 2.0.17 placement and the relocated decompressor (DOMAIN 3.2, 2.4) --------------------


def align_up(value: int, align: int = PAGE) -> int:
    return (value + align - 1) & ~(align - 1)


def kexec_2_0_17_layout(
    ram_base: int,
    initrd_size: int,
    *,
    size: int,
    inflated: int,
    kernel_bss: int,
    text_offset: int,
    restart: int,
    reloc_pad: int,
    stack_end: int,
    malloc: int = MALLOC_SIZE,
) -> dict[str, int | tuple[int, int]]:
    """Where kexec puts things with its default image size, where the decompressor goes, and the smallest
    page-aligned --image-size whose initrd clears the decompressor's malloc arena (nothing is written
    higher: the kernel's bss ends below the relocated copy)."""
    load = ram_base + 0x8000  # L: kexec's kernel_base, which assumes TEXT_OFFSET 0x8000
    kernel = (ram_base & 0xF8000000) + text_offset  # K: AUTO_ZRELADDR
    image_size = max(inflated + kernel_bss, inflated + size + KEXEC_EXTRA)
    initrd = load + align_up(image_size)
    dest = (kernel + inflated + reloc_pad) & ~255
    source = (load + restart) & ~31
    copy_end = dest + align_up(load + size - source, 32)
    malloc_end = dest - source + load + stack_end + malloc
    return {
        "image_size": image_size,
        "initrd": initrd,
        "dtb": (initrd + initrd_size + PAGE) & ~(PAGE - 1),
        "copy": (dest, copy_end),
        "malloc_end": malloc_end,
        "kernel_bss_end": kernel + inflated + kernel_bss,
        "advice": align_up(malloc_end - load),
    }
