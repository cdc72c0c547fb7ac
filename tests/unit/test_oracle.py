"""Oracle: placement per kexec-tools version, footprints, collisions, verdicts, advice, CLI.

Expected numbers come from the seed logs and DOMAIN.md sections 3-4, not from running the code; for the
cached Debian kernel, from kernel_facts.toml or its own package (see the Debian section).
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import pytest
from debian_kernel import KernelTree, align_up, facts_for, kexec_2_0_17_layout, package_facts

from testbench.errors import UserError
from testbench.inputs.kexeclog import parse_kexec_log
from testbench.inputs.zimage import parse_zimage, read_zimage
from testbench.oracle import AdviceError, advise, analyze, locate_hole, place, predict, version_family
from testbench.oracle.collide import find_collisions
from testbench.report.svg import memory_map_svg

VIRT_1G = [(0x40000000, 0x80000000)]
MiB = 1 << 20


# --- placement ------------------------------------------------------------------------------------------


def test_place_seed_a():
    p = place([(0x20000000, 0xA0000000)], ">=2.0.17", 0x443AC0, 0x443AC0, 0xB78080, 0x3D3C0, None, 0x167213D, 0x6043)
    assert p.kernel_base == 0x20008000
    assert p.image_size == 0xFCCB40
    assert p.initrd == (0x20FD5000, 0x167213D)
    assert p.dtb == (0x22648000, 0x6043)
    assert p.kernel_memsz == 0x444000


@pytest.mark.parametrize("initrd, dtb_at", [(0x53F46A, 0x11A50000), (None, 0x11511000)])
def test_place_seed_b(initrd, dtb_at):
    p = place(
        [(0x10000000, 0x50000000)],
        version_family("2.0.20"),
        0x7273A8,
        0x7273A8,
        0xDBEDB8,
        0x7489F8,
        None,
        initrd,
        0xB044,
    )
    assert p.image_size == 0x15077B0
    assert p.dtb[0] == dtb_at
    if initrd:
        assert p.initrd[0] == 0x11510000


def test_place_clearfog_ram_at_zero():
    p = place([(0, 0x40000000)], ">=2.0.17", 0x7273A8, 0x7273A8, 0xDBEDB8, 0x7489F8, None, None, 0x7BE3)
    assert p.kernel_base == 0x8000
    assert p.dtb == (0x1511000, 0x7BE3)


def test_image_size_only_raises_in_2_0_17():
    args = ([(0x20000000, 0xA0000000)], ">=2.0.17", 0x443AC0, 0x443AC0, 0xB78080, 0x3D3C0)
    assert place(*args, 0x100000, None, 0x6043).image_size == 0xFCCB40
    assert place(*args, 0x2000000, None, 0x6043).dtb[0] == 0x20008000 + 0x2000000 + 0x1000


def test_old_rules():
    # <= 2.0.12: base + ALIGN(4 * file length); 2.0.13-15: kernel_base + ALIGN(5 * Z); DTB one page after
    ram = [(0x60000000, 0x70000000)]
    p12 = place(ram, version_family("2.0.12"), 0x3A1F00, 0x3A1F00, None, None, None, None, 0x3B7C)
    assert p12.dtb[0] == 0x60000000 + 0xE88000 + 0x1000
    p14 = place(ram, version_family("2.0.14"), 0x3A1F00, 0x3A1F00, None, None, None, 0x1000, 0x3B7C)
    assert p14.initrd[0] == 0x60008000 + 0x122A000
    assert p14.dtb[0] == 0x60008000 + 0x122A000 + 0x2000
    p16 = place(ram, version_family("2.0.16"), 0x3A1F00, 0x3A1F00, 0xB78080, 0x3D3C0, None, None, 0x3B7C)
    assert p16.dtb[0] == 0x60008000 + 0xBB6000 + 0x1000


def test_locate_hole_over_holes():
    ram = [(0x40000000, 0x41000000), (0x42000000, 0x50000000)]
    assert locate_hole(ram, [], 0x2000, 0x40FFF000) == 0x42000000
    assert locate_hole(ram, [(0x42000000, 0x42001000)], 0x1000, 0x40FFF001) == 0x42001000
    assert locate_hole(ram, [], 0x20000000, 0) is None
    p = place(ram, ">=2.0.17", 0x443AC0, 0x443AC0, 0xB78080, 0x3D3C0, None, 0x1000000, 0x6043)
    assert p.initrd[0] == 0x42000000  # 0x40FD5000 + 16 MiB does not fit below the hole


def test_version_family():
    assert version_family("1:2.0.25-3+deb12u1") == ">=2.0.17"
    assert version_family("v2.0.13") == "2.0.13-2.0.15"
    with pytest.raises(UserError):
        version_family("banana")


# --- seed logs through analyze ------------------------------------------------------------------------


def test_seed_a_malloc_overlaps_initrd(seed_text):
    pred = analyze(parse_kexec_log(seed_text("seed_a")))
    regions = {r.name: (r.start, r.end) for r in pred.regions}
    assert regions["decompressor.copy"] == (0x20B80B00, 0x20FC4500)
    assert regions["decompressor.malloc"] == (0x20FC5500, 0x20FD5500)  # decompressor bss shown as 0
    assert [(c.a, c.b, c.start, c.end) for c in pred.collisions] == [
        ("decompressor.malloc", "initrd", 0x20FD5000, 0x20FD5500)
    ]  # the first 0x500 + bss bytes
    assert pred.collisions[0].severity == "benign"  # 0xFB00 - bss into the arena, above MALLOC_USED_BOUND
    assert pred.verdict == "safe"
    assert any("C: line" in a for a in pred.assumptions)


def test_malloc_overlap_is_benign_only_from_32_kib_into_the_arena():
    # The decoders' state fits in the arena's first 32 KiB (XZ ~29 KiB, collide.py): an initrd starting at
    # arena + 0x8000 loses nothing the decompressor writes, one byte lower it does.
    written = [("decompressor.malloc", 0x1000, 0x11000)]
    at_bound = find_collisions(written, [("initrd", 0x9000, 0x20000)], None)
    below = find_collisions(written, [("initrd", 0x8FFF, 0x20000)], None)
    assert [(c.start, c.end, c.severity) for c in at_bound] == [(0x9000, 0x11000, "benign")]
    assert [(c.start, c.end, c.severity) for c in below] == [(0x8FFF, 0x11000, "fatal")]


def test_seed_b_depends_on_text_offset(seed_text):
    log = parse_kexec_log(seed_text("seed_b"))
    pred = analyze(log)
    assert pred.verdict == "unknown"
    assert len(pred.undecided) == 1 and pred.undecided[0].startswith("TEXT_OFFSET: safe for 0x8000;")
    assert analyze(log, text_offset=0x8000).verdict == "safe"
    bad = analyze(log, text_offset=0x208000)
    assert bad.verdict == "collision"
    # K = 0x10208000: the kernel ends at 0x1170F7B0, into the initrd at 0x11510000
    assert any(c.a == "kernel.bss" and c.b == "initrd" and c.start == 0x11510000 for c in bad.collisions)


def test_seed_b_footprint_end_worst_case(seed_text):
    pred = analyze(parse_kexec_log(seed_text("seed_b")), text_offset=0x8000)
    malloc = next(r for r in pred.regions if r.name == "decompressor.malloc")
    assert malloc.end == 0x114FFBE8  # DOMAIN 4: R&~31 = 0xC0, P = 0xC00, b = 0
    kernel_bss = next(r for r in pred.regions if r.name == "kernel.bss")
    assert kernel_bss.end == 0x1150F7B0


# --- the Debian armmp zImage ---------------------------------------------------------------------------
# Expectations for whichever kernel the cache holds, never from the oracle itself: exact numbers from
# kernel_facts.toml when the zImage's sha256 is there, else DOMAIN 3.2/2.4 worked from the package's own
# facts (debian_kernel.package_facts), with the decompressor constants R, P and its bss, which only the
# binary holds, spanning DOMAIN 7.1's ranges: the footprint is then known to within a few KiB.


@dataclass(frozen=True)
class DebianExpect:
    exact: dict | None  # the table's virt_2_0_25 entry
    lo: dict  # kexec_2_0_17_layout with the unknowns at the low end of their ranges
    hi: dict  # ... and at the high end (for a known build both are exact)


@pytest.fixture(scope="module")
def expect(debian_zimage) -> DebianExpect:
    facts = facts_for(debian_zimage)
    if facts is not None:
        known = dict(
            size=facts["size"],
            inflated=facts["inflated_size"],
            kernel_bss=facts["kernel_bss"],
            text_offset=facts["text_offset"],
        )
        exact = kexec_2_0_17_layout(
            0x40000000,
            MiB,
            **known,
            restart=facts["restart"],
            reloc_pad=facts["reloc_pad"],
            stack_end=facts["stack_end"],
        )
        assert exact["advice"] == facts["virt_2_0_25"]["advice"]  # test_kernel_facts checks every field
        return DebianExpect(facts["virt_2_0_25"], exact, exact)
    if not KernelTree(debian_zimage).config.is_file():
        pytest.skip(f"{debian_zimage} is in no kernel_facts.toml entry and has no package config beside it")
    pf = package_facts(debian_zimage)
    if pf.inflated_size is None:
        pytest.skip(f"{pf.compression} payload: its inflated size has no source but the tag under test")
    known = dict(size=pf.size, inflated=pf.inflated_size, kernel_bss=pf.kernel_bss, text_offset=pf.text_offset)
    # malloc_end grows with P and the decompressor bss, and falls as restart rises
    lo = kexec_2_0_17_layout(
        0x40000000, MiB, **known, restart=0x1FE0, reloc_pad=0x800, stack_end=align_up(pf.size, 8) + 4096
    )
    hi = kexec_2_0_17_layout(
        0x40000000, MiB, **known, restart=0, reloc_pad=0xC00, stack_end=align_up(pf.size + 0x1000, 8) + 4096
    )
    return DebianExpect(None, lo, hi)


def test_debian_default_placement_collides(debian_zimage, expect):
    zi = read_zimage(debian_zimage)
    pred = predict(zi, VIRT_1G, "2.0.25", None, MiB, MiB)
    lo, hi = expect.lo, expect.hi
    # max(I + B, I + Z + 0x11000): no decompressor constant involved, so exact for any build
    assert pred.placement.image_size == lo["image_size"]
    assert pred.placement.initrd[0] == lo["initrd"]
    assert pred.placement.dtb[0] == lo["dtb"]
    regions = {r.name: (r.start, r.end) for r in pred.regions}
    assert regions["kernel.bss"][1] == lo["kernel_bss_end"]
    copy, malloc_end = regions["decompressor.copy"], regions["decompressor.malloc"][1]
    if expect.exact is not None:
        assert copy == tuple(expect.exact["copy"])
        assert malloc_end == expect.exact["malloc_end"]
    else:
        assert lo["copy"][0] <= copy[0] <= hi["copy"][0] and lo["copy"][1] <= copy[1] <= hi["copy"][1]
        assert lo["malloc_end"] <= malloc_end <= hi["malloc_end"]
    assert pred.verdict == "collision"
    # The copy is written whole: a payload it overlaps for every R and P is hit for sure; one the footprint
    # could reach at most may be.
    payloads = {"initrd": (lo["initrd"], lo["initrd"] + MiB), "dtb": (lo["dtb"], lo["dtb"] + MiB)}
    must = {n for n, (s, e) in payloads.items() if hi["copy"][0] < e and lo["copy"][1] > s}
    may = {n for n, (s, e) in payloads.items() if lo["copy"][0] < e and hi["malloc_end"] > s}
    hit = {c.b for c in pred.collisions if c.severity == "fatal"}
    assert must <= hit <= may and must, (must, hit, may)


def test_debian_advise_virt(debian_zimage, expect):
    zi = read_zimage(debian_zimage)
    a = advise(zi, VIRT_1G, "2.0.25", MiB, MiB)
    assert a.needed
    # the initrd must start at or above the malloc arena's end: 0x40008000 + ALIGN(x, 4K) >= malloc_end
    if expect.exact is not None:
        assert a.image_size == expect.exact["advice"]
    else:
        assert expect.lo["advice"] <= a.image_size <= expect.hi["advice"]
    assert predict(zi, VIRT_1G, "2.0.25", a.image_size, MiB, MiB).collisions == ()
    assert predict(zi, VIRT_1G, "2.0.25", a.minimum, MiB, MiB).collisions == ()
    # one page less: the initrd starts a page lower, inside the top of the malloc arena (advice is strict)
    less = predict(zi, VIRT_1G, "2.0.25", a.image_size - 0x1000, MiB, MiB)
    got = [(c.a, c.b, c.start, c.end) for c in less.collisions]
    if expect.exact is not None:
        assert got == [
            ("decompressor.malloc", "initrd", 0x40008000 + a.image_size - 0x1000, expect.exact["malloc_end"])
        ]
    else:
        assert [g[:2] for g in got] == [("decompressor.malloc", "initrd")]


# --- synthetic zImages through predict/advise ----------------------------------------------------------


def test_no_image_size_needed_for_small_kernel(make_zimage):
    # TEXT_OFFSET 0x8000 and a kernel bss larger than Z + 0x11000 + P: kexec's total covers the decompressor
    zi = parse_zimage(make_zimage(z=0x8000, inflated=0x200000, kbss=0x100000, text_offset=0x8000))
    a = advise(zi, VIRT_1G, "2.0.25", MiB, MiB)
    assert not a.needed and a.image_size is None


def test_advise_impossible_in_tiny_ram(make_zimage):
    zi = parse_zimage(make_zimage(inflated=0x1000000))
    with pytest.raises(AdviceError):
        advise(zi, [(0x40000000, 0x41200000)], "2.0.25", MiB, MiB)


def test_unknown_without_tag(make_zimage):
    raw = bytearray(make_zimage())
    raw[0x34:0x38] = bytes(4)
    pred = predict(parse_zimage(bytes(raw)), VIRT_1G, "2.0.14", None, MiB, MiB)
    assert pred.verdict == "unknown"
    assert "inflated" in pred.undecided[0]


# --- CLI and SVG ---------------------------------------------------------------------------------------


def _cli(argv):
    import argparse

    from testbench import oracle_cli

    parser = argparse.ArgumentParser()
    oracle_cli.register(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_analyze_json(tmp_path, capsys):
    log = tmp_path / "b.txt"
    log.write_text((__import__("pathlib").Path(__file__).parent / "data" / "seed_b.txt").read_text())
    svg = tmp_path / "b.svg"
    assert _cli(["analyze", str(log), "--json", "--svg", str(svg)]) == 3
    out = json.loads(capsys.readouterr().out)
    assert out["verdict"] == "unknown"
    assert set(out) >= {"verdict", "collisions", "layout", "assumptions"}
    assert any("TEXT_OFFSET" in a for a in out["assumptions"])
    ET.fromstring(svg.read_text())
    assert _cli(["analyze", str(log), "--text-offset", "0x208000"]) == 1
    assert "verdict: collision" in capsys.readouterr().out


def test_cli_bad_input(tmp_path):
    empty = tmp_path / "e.txt"
    empty.write_text("nothing here\n")
    with pytest.raises(UserError):
        _cli(["analyze", str(empty)])
    with pytest.raises(UserError):
        _cli(["analyze", str(tmp_path / "missing.txt")])
    with pytest.raises(UserError):
        _cli(["advise", "--kernel", str(empty), "--machine", "virt"])


def test_cli_advise(debian_zimage, expect, capsys):
    assert _cli(["advise", "--kernel", str(debian_zimage), "--machine", "virt", "--initrd-size", "1M"]) == 0
    advised = re.findall(r"--image-size=(0x[0-9a-f]+)", capsys.readouterr().out)
    assert advised, "no --image-size in the advice"
    if expect.exact is not None:
        assert int(advised[0], 16) == expect.exact["advice"]
    else:
        assert expect.lo["advice"] <= int(advised[0], 16) <= expect.hi["advice"]


def test_svg_marks_fatal_in_red(debian_zimage):
    pred = predict(read_zimage(debian_zimage), VIRT_1G, "2.0.25", None, MiB, MiB)
    svg = memory_map_svg(pred.regions, pred.collisions, "debian")
    ET.fromstring(svg)
    assert "#e00000" in svg and "decompressor.copy x initrd" in svg
