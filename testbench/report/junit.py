"""junit.xml for a matrix run or a merge of shards: one testcase per cell, as CI systems display them.

A cell is a failure when its verdict is not the expected one, an error when the bench broke (`error`) or no
shard ran it (`missing`); its provenance (inputs, versions, sha256, verdict, phase) goes into properties,
like the pytest plugin's.
"""

from __future__ import annotations

import os
from pathlib import Path
from xml.etree import ElementTree as ET

SUITE = "testbench.matrix"


def _properties(result: dict) -> dict[str, str]:
    props: dict[str, object] = {
        "verdict": result.get("verdict"),
        "phase": result.get("phase"),
        "expected": (result.get("cell") or {}).get("expect"),
        "oracle_agrees": result.get("oracle_agrees"),
        "qemu_version": result.get("qemu_version"),
        "loader_version": result.get("loader_version"),
        "stage1": (result.get("stage1") or {}).get("from"),
        "shard": result.get("shard"),
    }
    inputs = dict(result.get("inputs") or {})
    debian = inputs.pop("debian", None) or {}
    props["debian_suite"] = debian.get("suite")
    props["debian_lock_sha256"] = debian.get("lock_sha256")
    for role, item in inputs.items():
        if isinstance(item, dict) and "path" in item:
            version = f" {item['version']}" if item.get("version") else ""
            props[f"input.{role}"] = f"{os.path.basename(item['path'])}{version} sha256:{item.get('sha256')}"
    return {k: str(v) for k, v in props.items() if v is not None}


def junit_xml(results: list[dict], summary: dict) -> bytes:
    errors = sum(r.get("verdict") in ("error", "missing") for r in results)
    failures = sum(not r.get("expected_ok", True) and r.get("verdict") not in ("error", "missing") for r in results)
    suite = ET.Element(
        "testsuite",
        name=SUITE,
        tests=str(len(results)),
        failures=str(failures),
        errors=str(errors),
        time=f"{summary.get('wall_seconds') or 0:.1f}",
    )
    for result in results:
        cell = result.get("cell") or {}
        case = ET.SubElement(
            suite, "testcase", classname=SUITE, name=str(cell.get("id")), time=f"{result.get('wall_seconds') or 0:.2f}"
        )
        props = ET.SubElement(case, "properties")
        for name, value in _properties(result).items():
            ET.SubElement(props, "property", name=name, value=value)
        reasons = [str(r) for r in result.get("reasons") or []]
        headline = f"{result.get('verdict')} (phase {result.get('phase')}): {reasons[0] if reasons else ''}"
        if result.get("verdict") in ("error", "missing"):
            ET.SubElement(case, "error", message=headline[:300]).text = "\n".join(reasons)
        elif not result.get("expected_ok", True):
            message = f"expected {cell.get('expect')}, got {headline}"
            ET.SubElement(case, "failure", message=message[:300]).text = "\n".join(reasons)
        ET.SubElement(case, "system-out").text = "\n".join(reasons)
    ET.indent(suite)
    return ET.tostring(suite, encoding="utf-8", xml_declaration=True) + b"\n"


def write_junit(out: Path, results: list[dict], summary: dict) -> Path:
    path = out / "junit.xml"
    path.write_bytes(junit_xml(results, summary))
    return path
