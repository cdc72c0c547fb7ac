"""The tag-aware kexec-tools rule (images/kexec-patches/arm-zimage-tag-aware.patch) as the oracle's own family.

Numbers come from a real run of the patched loader (tests/unit/data/kexec-2.0.25-tag-aware-virt-6.1.0-57.txt:
`testbench run --machine virt --kexec built:tag-aware`, Debian's 6.1.0-57 armmp zImage, 2026-12-02) and from
kernel_facts.toml (measured with od, worked by hand), never from the oracle itself.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from debian_kernel import facts_zimage, load_facts
from zimage_builder import build_zimage

from testbench.inputs.kexeclog import parse_kexec_log
from testbench.inputs.zimage import parse_zimage
from testbench.oracle import advise, predict
from testbench.oracle.placement import PAGE, TAG_AWARE, align_up, place
from testbench.oracle.placement_check import check_placement

DATA = Path(__file__).parent / "data"
VIRT = [(0x40000000, 0x80000000)]
MiB = 1 << 20
DEBIAN_6_1_0_57 = "41ae0a8ffadcdbecce5b129e12f1751e0ccaf42fdf0604ab74c414b95789d481"


def test_the_patched_loaders_own_log_follows_the_tag_aware_rules():
    log = parse_kexec_log((DATA / "kexec-2.0.25-tag-aware-virt-6.1.0-57.txt").read_text())
    zi = facts_zimage(DEBIAN_6_1_0_57)
    check = check_placement(log, zi, TAG_AWARE)
    assert check is not None and check.agrees, check
    assert check.predicted["image_size"] == 0x1AE94A8  # "Resulting kernel space: 0x01ae94a8"
    stock = check_placement(log, zi, ">=2.0.17")
    assert stock is not None and not stock.agrees  # the stock rule puts the initrd at 0x418f2000


@pytest.mark.parametrize("sha", sorted(load_facts()), ids=lambda sha: load_facts()[sha]["release"])
def test_tag_aware_initrd_within_one_page_of_the_lowest_safe_address(sha):
    """kernel_facts' virt_2_0_25: the relocated decompressor's malloc arena ends at malloc_end (by hand), so
    the lowest page the initrd can safely start at is align_up(malloc_end); the patch must not go below it
    and may waste at most one page."""
    facts = load_facts()[sha]["virt_2_0_25"]
    zi = facts_zimage(sha)
    pl = place(
        VIRT,
        TAG_AWARE,
        zi.size,
        zi.data_size,
        zi.inflated_size,
        zi.kernel_bss,
        None,
        MiB,
        MiB,
        tag_words=(zi.text_offset, zi.malloc_size),
        efi_stub=True,
    )
    lowest = align_up(max(facts["malloc_end"], facts["kernel_bss_end"]), PAGE)
    assert pl.initrd is not None
    assert 0 <= pl.initrd[0] - lowest <= PAGE, (hex(pl.initrd[0]), hex(lowest))
    pred = predict(zi, VIRT, TAG_AWARE, initrd_size=MiB, dtb_size=MiB)
    assert pred.verdict == "safe" and not pred.collisions
    # and against the oracle's own advice for the stock loader: the same page, or the one after it
    adv = advise(zi, VIRT, "2.0.25", MiB, MiB)
    assert adv.image_size is not None
    assert 0 <= pl.initrd[0] - (pl.kernel_base + adv.image_size) <= PAGE


@pytest.mark.parametrize("words", [2, 3, 4, 5])
def test_short_tags_place_exactly_like_the_stock_loader(words):
    """Without both TEXT_OFFSET and MALLOC_SIZE words the patch must keep today's behaviour."""
    zi = parse_zimage(build_zimage(z=0x300000, tag_words=words, inflated=0xB78080, kbss=0x3D3C0))
    for image_size in (None, 0x2000000):
        stock = predict(zi, VIRT, "2.0.25", image_size, MiB, MiB).placement
        patched = predict(zi, VIRT, TAG_AWARE, image_size, MiB, MiB).placement
        assert stock is not None and patched is not None
        assert stock._replace(family=TAG_AWARE) == patched


def test_image_size_only_raises_the_tag_aware_reservation():
    zi = facts_zimage(DEBIAN_6_1_0_57)
    small = predict(zi, VIRT, TAG_AWARE, 0x1000000, MiB, MiB).placement
    large = predict(zi, VIRT, TAG_AWARE, 0x3000000, MiB, MiB).placement
    assert small is not None and large is not None
    assert small.image_size == 0x1AE94A8 and large.image_size == 0x3000000


def _built_zimages() -> list[Path]:
    from testbench.inputs.images import built_dir

    root = built_dir("kernels", "x").parent
    return sorted(p for p in root.glob("*/zImage") if not p.parent.is_symlink())


@pytest.mark.parametrize("zimage", _built_zimages() or [None], ids=lambda p: p.parent.name if p else "none-built")
@pytest.mark.parametrize("ram_end", [0x50000000, 0x80000000])
def test_tag_aware_is_tight_for_every_built_kernel(zimage, ram_end):
    """scripts/build-kernel's variants (non-EFI, TEXT_OFFSET 0x8000; exact constants from their decompressor
    ELF): the patched placement is strictly safe and no more than one page above the lowest strictly safe
    initrd start, as advised for the stock loader."""
    if zimage is None:
        pytest.skip("no scripts/build-kernel variant is built")
    from testbench.inputs.zimage import read_zimage

    zi = read_zimage(zimage)
    ram = [(0x40000000, ram_end)]
    patched = predict(zi, ram, TAG_AWARE, None, 32 * MiB, MiB)
    assert patched.verdict == "safe" and not patched.collisions
    adv = advise(zi, ram, "2.0.25", 32 * MiB, MiB)
    stock = predict(zi, ram, "2.0.25", None, 32 * MiB, MiB).placement
    assert patched.placement is not None and stock is not None and stock.initrd is not None
    lowest = patched.placement.kernel_base + adv.image_size if adv.image_size else stock.initrd[0]
    assert patched.placement.initrd is not None
    assert 0 <= patched.placement.initrd[0] - lowest <= PAGE
