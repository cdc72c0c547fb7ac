"""What a suite's Debian kernel is, read from its own package: the zImage's header, KLSZ tag and decompressor
constants (inputs.zimage), and the facts its `config-*` states independently (compression, the platforms
that set TEXT_OFFSET in arch/arm/Makefile, EFI stub, appended-DTB support). `testbench images facts`."""

from __future__ import annotations

from dataclasses import dataclass

from .images import Images, debian_suite, load_images
from .zimage import read_zimage

# arch/arm/Makefile (5.10..6.12): the first of these that is enabled sets TEXT_OFFSET; otherwise 0x8000
TEXT_OFFSET_RULES = (
    (
        ("CONFIG_ARCH_MSM8X60", "CONFIG_ARCH_MSM8960", "CONFIG_ARCH_MESON", "CONFIG_ARCH_IPQ40XX", "CONFIG_SA1111"),
        0x208000,
    ),
    (("CONFIG_ARCH_AXXIA",), 0x308000),
    (("CONFIG_ARCH_H1940", "CONFIG_ARCH_RTD1195"), 0x108000),
)
COMPRESSIONS = ("GZIP", "LZMA", "XZ", "LZO", "LZ4")


@dataclass(frozen=True)
class KernelInfo:
    suite: str
    package: str
    version: str
    zimage_bytes: int
    tag_words: int | None
    text_offset: int | None  # the tag's word
    config_text_offset: int  # what the package's config implies
    compression: str  # the package's config
    inflated: int | None
    kernel_bss: int | None
    malloc_size: int | None
    restart: int | None
    wont_overwrite: int | None
    reloc_pad: int | None
    decompressor_bss: int | None
    efi_stub: bool
    appended_dtb: bool  # CONFIG_ARM_APPENDED_DTB

    def rows(self) -> list[tuple[str, str]]:
        def h(v: int | None) -> str:
            return "?" if v is None else f"{v:#x}"

        agree = "agrees" if self.text_offset == self.config_text_offset else "DIFFERS"
        return [
            ("package", f"{self.package} {self.version} ({self.suite})"),
            ("zImage", f"{self.zimage_bytes:,} bytes, {'EFI stub' if self.efi_stub else 'no EFI stub'}"),
            ("compression", f"{self.compression} (config)"),
            ("KLSZ tag", f"{self.tag_words} words"),
            ("TEXT_OFFSET", f"{h(self.text_offset)} (tag); config says {h(self.config_text_offset)}: {agree}"),
            ("inflated / kernel bss", f"{h(self.inflated)} / {h(self.kernel_bss)}"),
            ("MALLOC_SIZE", h(self.malloc_size)),
            ("restart / wont_overwrite", f"{h(self.restart)} / {h(self.wont_overwrite)}"),
            ("relocation pad / decompressor bss", f"{h(self.reloc_pad)} / {h(self.decompressor_bss)}"),
            ("ARM_APPENDED_DTB", "y" if self.appended_dtb else "n"),
        ]


def read_config(images: Images) -> dict[str, str]:
    path = images.tree(images.kernel_package) / "boot" / f"config-{images.kernel_release}"
    out: dict[str, str] = {}
    for line in path.read_text(errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if sep and key.startswith("CONFIG_"):
            out[key] = value
    return out


def config_text_offset(config: dict[str, str]) -> int:
    for names, offset in TEXT_OFFSET_RULES:
        if any(config.get(n) == "y" for n in names):
            return offset
    return 0x8000


def kernel_info(images: Images) -> KernelInfo:
    zi = read_zimage(images.zimage)
    config = read_config(images)
    compression = next((c for c in COMPRESSIONS if config.get(f"CONFIG_KERNEL_{c}") == "y"), "?")
    return KernelInfo(
        suite=images.suite,
        package=images.kernel_package,
        version=images.package(images.kernel_package).version,
        zimage_bytes=zi.file_size,
        tag_words=zi.tag_words,
        text_offset=zi.text_offset,
        config_text_offset=config_text_offset(config),
        compression=compression,
        inflated=zi.inflated_size,
        kernel_bss=zi.kernel_bss,
        malloc_size=zi.malloc_size,
        restart=zi.restart,
        wont_overwrite=zi.wont_overwrite,
        reloc_pad=zi.reloc_pad,
        decompressor_bss=zi.decompressor_bss,
        efi_stub=zi.efi_stub,
        appended_dtb=config.get("CONFIG_ARM_APPENDED_DTB") == "y",
    )


def cma_area(config: dict[str, str]) -> tuple[int, int]:
    """(size, alignment) of the CMA area a build reserves at boot without a cma= argument: the size of a
    CONFIG_CMA_SIZE_SEL_MBYTES build, on a pageblock (PAGE_SIZE << (MAX_ORDER - 1)) boundary."""
    max_order = int(config.get("CONFIG_ARCH_FORCE_MAX_ORDER", "11") or 11)
    size = int(config.get("CONFIG_CMA_SIZE_MBYTES", "0") or 0) << 20 if config.get("CONFIG_DMA_CMA") == "y" else 0
    return size, 0x1000 << (max_order - 1)


def debian_cma(kernel: str | None) -> tuple[int, int] | None:
    """The CMA area in the package config of `debian`/`debian:SUITE` (the cached zImage); None otherwise."""
    is_debian, suite = debian_suite(kernel)
    return cma_area(read_config(load_images(suite))) if is_debian else None
