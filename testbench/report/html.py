"""index.html for a matrix run or a merge of shards: the matrix as a grid, then one row per cell.

The grid has a row per machine (and per RAM size, kernel, loader or memory map when the matrix varies them)
and a column per initrd size and placement; each cell is coloured by verdict, says its phase, carries a
tooltip with the clobbered ranges the emulator saw (or the first reason) and links its layout.svg,
console.log and repro.sh. Plain static HTML with relative links and no script, so it opens from disk
(file://) with no server.
"""

from __future__ import annotations

from html import escape
from pathlib import Path

COLOURS = {"pass": "#c8ecc8", "fail": "#f5c6c6", "error": "#f3e0a0", "missing": "#d8d8d8"}
ARTIFACTS = ("layout.svg", "console.log", "result.json", "repro.sh", "kexec-debug.txt")
GRID_LINKS = (("layout.svg", "svg"), ("console.log", "console"), ("repro.sh", "repro"))
ROW_AXES = ("machine", "ram", "kernel", "kexec", "memmap", "crashkernel")  # shown only when the matrix varies them
COLUMN_AXES = ("initrd", "placement")


def _links(out: Path, cell_id: str, names) -> list[tuple[str, str]]:
    return [(f"{cell_id}/{name}", label) for name, label in names if (out / cell_id / name).exists()]


def _tooltip(result: dict) -> str:
    cell = result["cell"]
    lines = [cell["id"], f"{result['verdict']} (phase {result.get('phase')})"]
    if cell.get("expect") and not result.get("expected_ok", True):
        lines.append(f"expected {cell['expect']}")
    clobbered = (result.get("observed") or {}).get("clobbered") or []
    for item in clobbered[:4]:
        lines.append(f"clobbered: {item.get('label') or item}")
    if len(clobbered) > 4:
        lines.append(f"... and {len(clobbered) - 4} more clobbered ranges")
    if not clobbered:
        lines.append("clobbered: nothing observed" if result.get("observed") else "not observed")
        reasons = result.get("reasons") or []
        if reasons:
            lines.append(str(reasons[0])[:200])
    return "\n".join(lines)


def _grid_cell(out: Path, result: dict) -> str:
    cell = result["cell"]
    verdict = result["verdict"]
    unexpected = not result.get("expected_ok", True)
    links = " ".join(f'<a href="{escape(href)}">{label}</a>' for href, label in _links(out, cell["id"], GRID_LINKS))
    mark = ' <b title="unexpected verdict">!</b>' if unexpected else ""
    hit = sorted(
        {str(c.get("segment")) for c in (result.get("observed") or {}).get("clobbered") or [] if c.get("segment")}
    )
    hit_line = f'<div class="ph">{escape(", ".join(hit))} hit</div>' if hit else ""
    return (
        f'<td class="cell v-{escape(verdict)}{" unexpected" if unexpected else ""}" id="cell-{escape(cell["id"])}" '
        f'data-cell="{escape(cell["id"])}" data-verdict="{escape(verdict)}" title="{escape(_tooltip(result))}">'
        f'<a class="v" href="#row-{escape(cell["id"])}">{escape(verdict)}</a>{mark}'
        f'<div class="ph">{escape(result.get("phase") or "")}</div>{hit_line}<div class="ln">{links}</div></td>'
    )


def _varying(results: list[dict], axes) -> list[str]:
    return [axis for axis in axes if len({str(r["cell"].get(axis)) for r in results}) > 1 or axis == axes[0]]


def grid(out: Path, results: list[dict]) -> str:
    if not results:
        return "<p>No cells.</p>"
    row_axes = _varying(results, ROW_AXES)
    at = {
        (tuple(str(r["cell"].get(a)) for a in row_axes), tuple(str(r["cell"].get(a)) for a in COLUMN_AXES)): r
        for r in results
    }
    rows = list(dict.fromkeys(row for row, _ in at))
    present = {column for _, column in at}
    sizes = list(dict.fromkeys(column[0] for _, column in at))
    placements = list(dict.fromkeys(column[1] for _, column in at))
    columns = [(size, placement) for size in sizes for placement in placements if (size, placement) in present]
    head1 = "".join(f"<th>{escape(axis)}</th>" for axis in row_axes)
    head1 += "".join(f'<th colspan="{sum(c[0] == size for c in columns)}">initrd {escape(size)}</th>' for size in sizes)
    head2 = f'<th colspan="{len(row_axes)}"></th>' + "".join(f"<th>{escape(c[1])}</th>" for c in columns)
    body = []
    for row in rows:
        tds = "".join(f'<th class="rk">{escape(v)}</th>' for v in row)
        for column in columns:
            result = at.get((row, column))
            tds += _grid_cell(out, result) if result else '<td class="none" title="not in the matrix">-</td>'
        body.append(f"<tr>{tds}</tr>")
    return f'<table class="grid"><tr>{head1}</tr><tr>{head2}</tr>\n' + "\n".join(body) + "</table>"


def _row(out: Path, result: dict) -> str:
    cell = result["cell"]
    cell_dir = cell["id"]
    links = " ".join(
        f'<a href="{escape(cell_dir)}/{name}">{name.split(".")[0]}</a>'
        for name in ARTIFACTS
        if (out / cell_dir / name).exists()
    )
    thumb = ""
    if (out / cell_dir / "layout.svg").exists():
        thumb = f'<a href="{escape(cell_dir)}/layout.svg"><img src="{escape(cell_dir)}/layout.svg" width="120"></a>'
    expected = "" if result.get("expected_ok", True) else f' <b title="expected">(expected {cell["expect"]})</b>'
    reasons = "<br>".join(escape(str(r)) for r in (result.get("reasons") or [])[:3])
    seconds = result.get("wall_seconds") or (result.get("timings") or {}).get("total") or 0
    shard = f"<td>{escape(str(result.get('shard') or ''))}</td>"
    return (
        f'<tr id="row-{escape(cell_dir)}" style="background:{COLOURS.get(result["verdict"], "#fff")}">'
        f"<td>{escape(cell['id'])}</td><td>{escape(cell['machine'])}</td><td>{escape(cell['ram'])}</td>"
        f"<td>{escape(cell['initrd'])}</td><td>{escape(cell['placement'])}</td>"
        f"<td><b>{escape(result['verdict'])}</b>{expected}</td><td>{escape(result.get('phase') or '')}</td>"
        f'<td>{seconds:.1f}s</td>{shard}<td class="r">{reasons}</td><td>{thumb}</td><td>{links}</td></tr>'
    )


def _provenance(summary: dict) -> str:
    ident = summary.get("identity") or {}
    matrix = ident.get("matrix") or {}
    parts = []
    if matrix:
        parts.append(f"matrix {escape(str(matrix.get('path')))} (sha256 {escape(str(matrix.get('sha256'))[:12])})")
    if ident.get("lock_sha256"):
        parts.append(f"lock sha256 {escape(ident['lock_sha256'][:12])}")
    if ident.get("bench_version"):
        parts.append(f"bench {escape(ident['bench_version'])}")
    if summary.get("shards"):
        parts.append(f"merged from {len(summary['shards'])} shards: {escape(', '.join(summary['shards']))}")
    elif summary.get("shard"):
        parts.append(f"shard {escape(summary['shard'])}")
    return "<br>".join(parts)


def _problems(summary: dict) -> str:
    lines = []
    for key, what in (("missing", "missing (no shard ran them)"), ("duplicates", "run by more than one shard")):
        if summary.get(key):
            lines.append(f"<p><b>{len(summary[key])} cells {what}:</b> {escape(', '.join(summary[key]))}</p>")
    return "\n".join(lines)


def write_matrix_report(out: Path, results: list[dict], summary: dict) -> Path:
    verdicts = ", ".join(f"{count} {verdict}" for verdict, count in summary["verdicts"].items())
    unexpected = summary["unexpected"]
    rows = "\n".join(_row(out, r) for r in results)
    legend = " ".join(f'<span class="key v-{v}">{v}</span>' for v in COLOURS)
    colours = "\n".join(f".v-{v} {{ background: {c}; }}" for v, c in COLOURS.items())
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>testbench matrix</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
table {{ border-collapse: collapse; font-size: 13px; }}
td, th {{ border: 1px solid #999; padding: 3px 6px; vertical-align: top; }}
th {{ background: #ddd; }}
table.rows th {{ position: sticky; top: 0; }}
td.r {{ max-width: 520px; font-size: 12px; }}
table.grid td.cell {{ min-width: 84px; text-align: center; }}
table.grid td.cell a.v {{ font-weight: bold; color: #000; text-decoration: none; }}
table.grid td.unexpected {{ outline: 3px solid #c00; outline-offset: -3px; }}
table.grid td.none {{ background: #f4f4f4; color: #999; text-align: center; }}
table.grid .ph {{ font-size: 11px; color: #333; }}
table.grid .ln {{ font-size: 11px; }}
th.rk {{ text-align: left; }}
.key {{ padding: 1px 8px; border: 1px solid #999; }}
{colours}
</style></head><body>
<h1>testbench matrix</h1>
<p>{summary["cells"]} cells in {summary["wall_seconds"]:.0f} s: {escape(verdicts)}.
Unexpected verdicts: <b>{len(unexpected)}</b>. Data: <a href="results.json">results.json</a>,
<a href="junit.xml">junit.xml</a>.<br>{_provenance(summary)}</p>
{_problems(summary)}
<p>{legend} <span class="key" style="outline: 3px solid #c00; outline-offset: -3px">unexpected</span>
Hover a cell for the clobbered ranges; click its verdict for its row below.</p>
{grid(out, results)}
<h2>Cells</h2>
<table class="rows">
<tr><th>cell</th><th>machine</th><th>RAM</th><th>initrd</th><th>placement</th><th>verdict</th><th>phase</th>
<th>time</th><th>shard</th><th>reasons</th><th>memory map</th><th>artifacts</th></tr>
{rows}
</table></body></html>
"""
    path = out / "index.html"
    path.write_text(page)
    return path
