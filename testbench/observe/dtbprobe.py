"""Does the DTB kexec loaded say what the load plan says? (read in process through testbench.dtb)"""

from __future__ import annotations

from pathlib import Path

from ..inputs import dtb
from .plan import SegmentSpec


def dtb_problems(path: Path, initrd: SegmentSpec | None, bootargs: str | None) -> list[str]:
    """Does the DTB kexec loaded say what the load plan says?"""
    problems = []
    try:
        data = path.read_bytes()
        dtb.get_cells(data, "/", "#address-cells")  # a blob libfdt cannot open is reported, not raised
    except (OSError, dtb.DtbError) as err:
        return [f"DTB {path.name} unreadable: {err}"]
    if initrd is not None:
        for prop, want in (("linux,initrd-start", initrd.start), ("linux,initrd-end", initrd.start + initrd.size)):
            cells = dtb.get_cells(data, "/chosen", prop)
            got = dtb.cells_value(cells) if cells else None
            if got != want:
                problems.append(f"DTB /chosen/{prop} = {got if got is None else hex(got)}, plan says {want:#x}")
    if bootargs is not None:
        got_args = dtb.get_string(data, "/chosen", "bootargs")
        if (got_args or "").strip() != bootargs.strip():
            problems.append(f"DTB /chosen/bootargs = {got_args!r}, plan says {bootargs!r}")
    return problems
