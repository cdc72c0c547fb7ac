"""What a matrix run and a merge of shards both leave in their dir: results.json, index.html, junit.xml and
durations.json (each cell's wall seconds, the cost `--shard` balances: see shard.py)."""

from __future__ import annotations

from pathlib import Path

from .artifacts import write_json_atomic
from .html import write_matrix_report
from .junit import write_junit


def verdict_counts(results: list[dict]) -> dict[str, int]:
    counts = {v: sum(r["verdict"] == v for r in results) for v in ("pass", "fail", "error")}
    missing = sum(r["verdict"] == "missing" for r in results)
    return counts | ({"missing": missing} if missing else {})


def durations(results: list[dict]) -> dict[str, float]:
    """Seconds per cell that ran to a verdict (an `error` or a missing cell says nothing about its cost)."""
    return {
        r["cell"]["id"]: float(r["wall_seconds"])
        for r in results
        if r["verdict"] in ("pass", "fail") and isinstance(r.get("wall_seconds"), int | float)
    }


def write_matrix_outputs(out: Path, results: list[dict], summary: dict) -> dict[str, Path]:
    write_json_atomic(out / "results.json", {"summary": summary, "results": results})
    write_json_atomic(out / "durations.json", durations(results))
    return {
        "results": out / "results.json",
        "index": write_matrix_report(out, results, summary),
        "junit": write_junit(out, results, summary),
        "durations": out / "durations.json",
    }
