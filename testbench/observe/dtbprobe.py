"""Does the DTB kexec loaded say what the load plan says? Read through `fdtget` (device-tree-compiler) for
now; the DTB module (pylibfdt, in process) is meant to replace this file."""

from __future__ import annotations

import subprocess
from pathlib import Path

from .plan import SegmentSpec


def fdtget(path: Path, *args: str) -> str | None:
    """`fdtget` on the DTB at `path` (options may follow the file: getopt permutes them): its output, or
    None when the node or property is not there."""
    run = subprocess.run(["fdtget", str(path), *args], capture_output=True, text=True)
    return run.stdout.strip() if run.returncode == 0 else None


def dtb_problems(path: Path, initrd: SegmentSpec | None, bootargs: str | None) -> list[str]:
    """Does the DTB kexec loaded say what the load plan says?"""
    problems = []
    if initrd is not None:
        for prop, want in (("linux,initrd-start", initrd.start), ("linux,initrd-end", initrd.start + initrd.size)):
            raw = fdtget(path, "-t", "x", "/chosen", prop)
            words = [int(w, 16) for w in raw.split()] if raw else []
            got = (words[0] << 32 | words[1]) if len(words) == 2 else (words[0] if words else None)
            if got != want:
                problems.append(f"DTB /chosen/{prop} = {got if got is None else hex(got)}, plan says {want:#x}")
    if bootargs is not None:
        got_args = fdtget(path, "-t", "s", "/chosen", "bootargs")
        if (got_args or "").strip() != bootargs.strip():
            problems.append(f"DTB /chosen/bootargs = {got_args!r}, plan says {bootargs!r}")
    return problems
