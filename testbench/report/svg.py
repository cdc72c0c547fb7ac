"""SVG memory map: labelled regions in lanes, the oracle's predicted collisions in red, the emulator's
observed clobbers in blue.

`memory_map_svg(regions, collisions, title, observed)` takes anything with name/start/end/role attributes
(or dicts with those keys), collisions with a/b/start/end/severity (result.json `predicted.collisions`) and
observed clobbers with segment/start/end (result.json `observed.clobbered`), so run results can reuse it.
The two kinds of mark differ in colour, hatch direction and outline: predicted ones span the three right
lanes with a red 45-degree hatch; observed ones sit on the segment lane only, cross-hatched in blue with a
dashed outline and labelled "observed", so a reader sees at once whether prediction and truth line up.

Physical memory spans GiBs while the interesting regions are KiBs apart, so the vertical axis is
piecewise: every gap between two region boundaries gets a height growing with log2 of its size. Small
overlaps stay visible, and the address labels at each boundary keep the picture honest.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from html import escape
from typing import Any

LANE_X = {"ram": 0, "loaded": 1, "payload": 1, "kernel": 2, "written": 3}
LANE_TITLES = ("RAM", "kexec segments", "kernel", "decompressor")
COLOURS = {"ram": "#eeeeee", "loaded": "#cfe3f7", "payload": "#9fd39f", "kernel": "#f6d48b", "written": "#c9b3e6"}
LEFT, LANE_W, GAP, TOP = 120, 170, 10, 50
OBSERVED = "#0b3d91"
OBSERVED_W = 64  # the observed band: the right end of the segment lane, clear of the segment's name


def _get(obj: Any, key: str) -> Any:
    return obj[key] if isinstance(obj, dict) else getattr(obj, key)


def _lane(name: str, role: str) -> str:
    if role == "written" and not name.startswith("decompressor"):
        return "kernel"
    return role if role in LANE_X else "written"


def _axis(points: Iterable[int]) -> tuple[list[int], list[float]]:
    addrs = sorted(set(points))
    ys = [float(TOP)]
    for lo, hi in zip(addrs, addrs[1:], strict=False):
        ys.append(ys[-1] + 14 + 9 * math.log2(1 + (hi - lo) / 4096))
    return addrs, ys


def _y(addr: int, addrs: list[int], ys: list[float]) -> float:
    # addresses are always boundaries, but interpolate to be safe
    lo, hi = 0, len(addrs) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if addrs[mid] < addr:
            lo = mid + 1
        else:
            hi = mid
    if addrs[lo] == addr or lo == 0:
        return ys[lo]
    a0, a1 = addrs[lo - 1], addrs[lo]
    return ys[lo - 1] + (ys[lo] - ys[lo - 1]) * (addr - a0) / (a1 - a0)


def memory_map_svg(
    regions: Sequence[Any], collisions: Sequence[Any] = (), title: str = "", observed: Sequence[Any] = ()
) -> str:
    regs = [
        (str(_get(r, "name")), int(_get(r, "start")), int(_get(r, "end")), str(_get(r, "role")))
        for r in regions
        if int(_get(r, "end")) > int(_get(r, "start"))
    ]
    cols = [
        (str(_get(c, "a")), str(_get(c, "b")), int(_get(c, "start")), int(_get(c, "end")), str(_get(c, "severity")))
        for c in collisions
    ]
    seen = [(str(_get(o, "segment")), int(_get(o, "start")), int(_get(o, "end"))) for o in observed]
    focus = [r for r in regs if r[3] != "ram"] or regs
    lo = min((r[1] for r in focus), default=0)
    hi = max((r[2] for r in focus), default=1)
    pts = {lo, hi}
    for _, s, e, _ in regs:
        pts.update(x for x in (s, e) if lo <= x <= hi)
    for *_, s, e, _ in cols:
        pts.update((s, e))
    for _, s, e in seen:
        pts.update((s, e))
    addrs, ys = _axis(pts)
    width = LEFT + 4 * (LANE_W + GAP) + 260
    height = int(ys[-1]) + 40 + 16 * (len(cols) + len(seen))
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="monospace" font-size="11">',
        '<defs><pattern id="hatch" width="6" height="6" patternUnits="userSpaceOnUse" '
        'patternTransform="rotate(45)"><rect width="3" height="6" fill="#e00000" opacity="0.55"/>'
        "</pattern>"
        f'<pattern id="observed" width="6" height="6" patternUnits="userSpaceOnUse">'
        f'<path d="M0,6 L6,0 M0,0 L6,6" stroke="{OBSERVED}" stroke-width="1.2"/></pattern></defs>',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="10" y="18" font-size="14" font-weight="bold">{escape(title)}</text>',
    ]
    for i, name in enumerate(LANE_TITLES):
        out.append(f'<text x="{LEFT + i * (LANE_W + GAP)}" y="{TOP - 8}" font-weight="bold">{name}</text>')
    for addr, y in zip(addrs, ys, strict=False):
        out.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" fill="#555">{addr:#010x}</text>')
        out.append(
            f'<line x1="{LEFT}" x2="{LEFT + 4 * (LANE_W + GAP)}" y1="{y:.1f}" y2="{y:.1f}" '
            'stroke="#ddd" stroke-width="0.5"/>'
        )
    for name, s, e, role in regs:
        lane = _lane(name, role)
        x = LEFT + LANE_X[lane] * (LANE_W + GAP)
        y0, y1 = _y(max(s, lo), addrs, ys), _y(min(e, hi), addrs, ys)
        out.append(
            f'<rect x="{x}" y="{y0:.1f}" width="{LANE_W}" height="{max(y1 - y0, 1):.1f}" '
            f'fill="{COLOURS[lane]}" stroke="#333" stroke-width="0.6"><title>{escape(name)} '
            f"[{s:#x}, {e:#x}) {e - s:#x} bytes</title></rect>"
        )
        out.append(f'<text x="{x + 4}" y="{y0 + 12:.1f}">{escape(name)} {e - s:#x}</text>')
    for a, b, s, e, sev in cols:
        y0, y1 = _y(s, addrs, ys), _y(e, addrs, ys)
        colour = "#e00000" if sev == "fatal" else "#ff9900"
        out.append(
            f'<rect x="{LEFT + LANE_W + GAP}" y="{y0:.1f}" width="{3 * (LANE_W + GAP) - GAP}" '
            f'height="{max(y1 - y0, 2):.1f}" fill="url(#hatch)" stroke="{colour}" stroke-width="2">'
            f"<title>{escape(a)} x {escape(b)} [{s:#x}, {e:#x}) {sev}</title></rect>"
        )
        out.append(
            f'<text x="{LEFT + 4 * (LANE_W + GAP) + 4}" y="{(y0 + y1) / 2 + 4:.1f}" fill="{colour}" '
            f'font-weight="bold">{escape(a)} x {escape(b)} ({sev})</text>'
        )
    # Observed clobbers last, on top: the right end of the segment lane, so the segment's name stays
    # readable on the left and the predicted hatch shows beside them.
    x = LEFT + LANE_X["loaded"] * (LANE_W + GAP) + LANE_W - OBSERVED_W
    for seg, s, e in seen:
        y0, y1 = _y(s, addrs, ys), _y(e, addrs, ys)
        out.append(
            f'<rect x="{x}" y="{y0:.1f}" width="{OBSERVED_W}" height="{max(y1 - y0, 3):.1f}" '
            f'fill="url(#observed)" fill-opacity="0.9" stroke="{OBSERVED}" stroke-width="2" '
            f'stroke-dasharray="5,2"><title>observed: {escape(seg)} clobbered [{s:#x}, {e:#x}) '
            f"{e - s:#x} bytes</title></rect>"
        )
        out.append(
            f'<text x="{x + 4}" y="{max(y0 + 12, (y0 + y1) / 2 + 4):.1f}" fill="{OBSERVED}" '
            'font-weight="bold" stroke="white" stroke-width="3" paint-order="stroke">observed</text>'
        )
    y = ys[-1] + 28
    for a, b, s, e, sev in cols:
        out.append(
            f'<text x="10" y="{y:.1f}" fill="{"#e00000" if sev == "fatal" else "#b36b00"}">'
            f"predicted {sev}: {escape(a)} x {escape(b)} [{s:#x}, {e:#x}) = {e - s:#x} bytes</text>"
        )
        y += 16
    for seg, s, e in seen:
        out.append(
            f'<text x="10" y="{y:.1f}" fill="{OBSERVED}">observed (emulator): {escape(seg)} clobbered '
            f"[{s:#x}, {e:#x}) = {e - s:#x} bytes</text>"
        )
        y += 16
    out.append("</svg>")
    return "\n".join(out)
