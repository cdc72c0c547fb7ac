"""index.html for a matrix run: one row per cell, coloured by verdict, linking the cell's artifacts.

Plain static HTML with relative links, so it opens from disk (file://) with no server.
"""

from html import escape
from pathlib import Path

COLOURS = {"pass": "#c8ecc8", "fail": "#f5c6c6", "error": "#f3e0a0"}
ARTIFACTS = ("layout.svg", "console.log", "result.json", "repro.sh", "kexec-debug.txt")


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
    reasons = "<br>".join(escape(r) for r in result.get("reasons", [])[:3])
    seconds = result.get("wall_seconds") or result.get("timings", {}).get("total", 0)
    return (
        f'<tr style="background:{COLOURS.get(result["verdict"], "#fff")}">'
        f"<td>{escape(cell['id'])}</td><td>{escape(cell['machine'])}</td><td>{escape(cell['ram'])}</td>"
        f"<td>{escape(cell['initrd'])}</td><td>{escape(cell['placement'])}</td>"
        f"<td><b>{escape(result['verdict'])}</b>{expected}</td><td>{escape(result.get('phase', ''))}</td>"
        f'<td>{seconds:.1f}s</td><td class="r">{reasons}</td><td>{thumb}</td><td>{links}</td></tr>'
    )


def write_matrix_report(out: Path, results: list[dict], summary: dict) -> Path:
    verdicts = ", ".join(f"{count} {verdict}" for verdict, count in summary["verdicts"].items())
    unexpected = summary["unexpected"]
    rows = "\n".join(_row(out, r) for r in results)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>testbench matrix</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
table {{ border-collapse: collapse; font-size: 13px; }}
td, th {{ border: 1px solid #999; padding: 3px 6px; vertical-align: top; }}
th {{ background: #ddd; position: sticky; top: 0; }}
td.r {{ max-width: 520px; font-size: 12px; }}
</style></head><body>
<h1>testbench matrix</h1>
<p>{summary["cells"]} cells in {summary["wall_seconds"]:.0f} s: {escape(verdicts)}.
Unexpected verdicts: <b>{len(unexpected)}</b>. Data: <a href="results.json">results.json</a>.</p>
<table>
<tr><th>cell</th><th>machine</th><th>RAM</th><th>initrd</th><th>placement</th><th>verdict</th><th>phase</th>
<th>time</th><th>reasons</th><th>memory map</th><th>artifacts</th></tr>
{rows}
</table></body></html>
"""
    path = out / "index.html"
    path.write_text(page)
    return path
