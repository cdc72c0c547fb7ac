"""What the dumps show: the byte ranges two dumps differ in, whether a segment held its file at the first
stop (load fidelity), and which dumps are kept in the case dir as evidence (dumps.json)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from .plan import SegmentSpec

# Two clobbered runs closer than this are one range: a written byte that happens to equal the old byte is
# invisible to a diff, and over random data that happens for 1 byte in 256, so runs split by a few
# coincidences are really one write.
COALESCE = 64
# The fill pattern for free RAM: a word no decompressor writes by accident (not 0, not a code pattern).
PATTERN = bytes.fromhex("5aa5c33c")
# Dumps kept as evidence: a segment that changed between the stops is kept whole up to this size; a bigger
# one (a 100 MB initrd with 2 MB clobbered) keeps only its changed ranges, unless they are too many pieces.
KEEP_WHOLE = 8 << 20
MAX_PIECES = 64


def diff_ranges(old: bytes, new: bytes, coalesce: int = COALESCE) -> list[tuple[int, int]]:
    """Byte ranges [start, end) where `new` differs from `old` (same length), runs closer than `coalesce`
    merged. XOR of two big integers is C-speed, and a regex finds the non-zero runs."""
    n = min(len(old), len(new))
    if old[:n] == new[:n]:
        return []
    x = (int.from_bytes(old[:n], "big") ^ int.from_bytes(new[:n], "big")).to_bytes(n, "big")
    out: list[tuple[int, int]] = []
    for m in re.finditer(rb"[^\x00]+", x):
        if out and m.start() - out[-1][1] < coalesce:
            out[-1] = (out[-1][0], m.end())
        else:
            out.append((m.start(), m.end()))
    return out


def segment_changes(
    first: dict[SegmentSpec, bytes], second: dict[SegmentSpec, bytes]
) -> dict[SegmentSpec, list[tuple[int, int]]]:
    """Each segment's changed byte ranges between two dumps: computed once, read by every consumer."""
    return {seg: diff_ranges(first[seg], second[seg]) for seg in first}


def load_fidelity(first: dict[SegmentSpec, bytes]) -> tuple[list[str], set[SegmentSpec]]:
    """Kernel and initrd segments at the first stop against the files they were loaded from: the problems,
    and the segments that hold exactly their file."""
    problems: list[str] = []
    as_loaded: set[SegmentSpec] = set()
    for seg, data in first.items():
        if seg.source is None or seg.role not in ("kernel", "initrd"):
            continue
        want = seg.source.read_bytes()[: seg.size]
        bad = diff_ranges(want, data)
        if len(want) != seg.size:
            problems.append(f"{seg.role} segment is {seg.size:#x} bytes, the file {len(want):#x}")
        if bad:
            problems.append(
                f"{seg.role} segment differs from {seg.source.name} at load: first at "
                f"+{bad[0][0]:#x}, {len(bad)} ranges"
            )
        elif len(want) == len(data):
            as_loaded.add(seg)
    return problems, as_loaded


def keep_evidence(
    out: Path,
    second: dict[SegmentSpec, bytes],
    changes: dict[SegmentSpec, list[tuple[int, int]]],
    as_loaded: set[SegmentSpec],
) -> list[dict]:
    """Drop the dumps that repeat a file already in the case dir (a stop-1 dump of a segment `as_loaded`, a
    stop-2 dump without `changes`), and list what each stop held in dumps.json: a matrix of 100 MB initrds
    wrote ~8 GB per run when every dump was kept."""
    listing = []
    for seg, changed in changes.items():
        stop1, stop2 = f"stop1-{seg.role}-{seg.start:08x}.bin", f"stop2-{seg.role}-{seg.start:08x}.bin"
        entry: dict = {"segment": seg.role, "start": seg.start, "size": seg.size, "stop1": stop1}
        if seg in as_loaded:
            (out / stop1).unlink()
            entry["stop1"] = f"not kept: equal to {seg.source} as loaded"
        if not changed:
            (out / stop2).unlink()
            entry["stop2"] = "not kept: equal to stop 1"
        elif seg.size > KEEP_WHOLE and len(changed) <= MAX_PIECES:
            (out / stop2).unlink()
            pieces = []
            for s, e in changed:
                piece = f"stop2-{seg.role}-{seg.start:08x}-changed-{seg.start + s:08x}-{seg.start + e:08x}.bin"
                (out / piece).write_bytes(second[seg][s:e])
                pieces.append(piece)
            entry["stop2"] = pieces
        else:
            entry["stop2"] = stop2
        listing.append(entry)
    (out / "dumps.json").write_text(json.dumps(listing, indent=1) + "\n")
    return listing
