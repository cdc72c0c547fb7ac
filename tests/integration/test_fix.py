"""The tag-aware kexec-tools patch, proven in QEMU (issue "Prove the fix"): the patched loader passes with
kexec's default placement where Debian's own 2.0.25 fails, the oracle's `tag-aware` family predicts its
placement, and a zImage whose tag lacks the TEXT_OFFSET/MALLOC_SIZE words is placed exactly as before."""

from __future__ import annotations

import struct

import pytest

from testbench.errors import UserError
from testbench.inputs.images import kexec_path

PATCHED = "built:tag-aware"


@pytest.fixture(scope="session")
def patched_kexec():
    try:
        return kexec_path(PATCHED)
    except UserError as err:
        pytest.skip(
            f"{err} (scripts/build-kexec --patch images/kexec-patches/arm-zimage-tag-aware.patch --name tag-aware)"
        )


def _segments(result) -> list[tuple[int, int]]:
    return [(s["mem"], s["memsz"]) for s in (result.load or {}).get("segments", [])]


@pytest.mark.parametrize("machine", ["virt", "vexpress-a9", "vexpress-a15"])
def test_patched_loader_passes_where_the_stock_one_fails(patched_kexec, run_kexec_case, machine):
    patched = run_kexec_case(machine, kexec=patched_kexec, until="kernel-entry")
    assert "Kernel TEXT_OFFSET 0x00208000" in (patched.request.out / "kexec-debug.txt").read_text()
    assert patched.verdict.verdict == "pass", patched.verdict
    assert patched.observation is not None and not patched.observation.clobbered
    assert patched.agreement is not None and patched.agreement.agrees, patched.agreement
    assert patched.placement is not None and patched.placement.family == "tag-aware" and patched.placement.agrees
    stock = run_kexec_case(machine, until="kernel-entry")
    assert stock.verdict.verdict == "fail", stock.verdict
    assert stock.observation is not None and stock.observation.clobbered
    # the patch moves only the payloads: the zImage stays at base + 0x8000
    assert _segments(patched)[0] == _segments(stock)[0]


def test_short_tag_is_placed_exactly_as_by_the_stock_loader(patched_kexec, run_kexec_case, images, tmp_path):
    """Debian's zImage with its KLSZ record cut to 4 words (size_ptr and bss_size only, as before Linux
    5.10): the patched loader must produce the stock loader's segments, byte for byte the same plan."""
    raw = bytearray(images.zimage.read_bytes())
    table = struct.unpack_from("<I", raw, 0x38)[0]
    words, tag = struct.unpack_from("<II", raw, table)
    assert (words, tag) == (6, 0x5A534C4B), "Debian's armmp zImage has a 6-word KLSZ tag"
    struct.pack_into("<I", raw, table, 4)
    cut = tmp_path / "zImage-tag4"
    cut.write_bytes(bytes(raw))
    patched = run_kexec_case("virt", kernel=cut, kexec=patched_kexec, until="kernel-entry")
    # (each case reuses the test's case dir: read the patched loader's own output before the stock run)
    assert "Kernel TEXT_OFFSET" not in (patched.request.out / "kexec-debug.txt").read_text()
    stock = run_kexec_case("virt", kernel=cut, until="kernel-entry")
    assert _segments(patched) and _segments(patched) == _segments(stock)
    assert patched.placement is not None and patched.placement.agrees
