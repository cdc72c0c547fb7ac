"""Per-case artifacts next to result.json: repro.sh, kexec-debug.txt, iomem.txt, the DTB loaded and the
memory map (layout.svg: the oracle's layout and predicted collisions, and with --observe or replay the
clobbered ranges the emulator saw)."""

import json
import shlex
import shutil
from pathlib import Path

from ..emulator.qemu import QemuSpec, qemu_args
from ..fileio import write_atomic
from .svg import memory_map_svg


def write_json_atomic(path: Path, data: dict) -> None:
    """Nobody ever reads half a result."""
    write_atomic(path, (json.dumps(data, indent=2) + "\n").encode())


def repro_script(spec: QemuSpec) -> str:
    """repro.sh for a case whose stage 1 is `spec`."""
    hand = qemu_args(spec.__class__(**{**spec.__dict__, "append": spec.append + " tb.autorun"}), None)
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in spec.machine.env)
    return "\n".join(
        [
            "#!/bin/sh",
            "# Reruns this case by hand with the console on this terminal (quit QEMU with Ctrl-A X).",
            "# Stage 1 boots with tb.autorun and runs share/autorun.sh: the same commands the bench typed,",
            "# ending with kexec -e. Edit share/autorun.sh to change the kexec arguments.",
            'cd "$(dirname "$0")" || exit 1',
            f"exec {'env ' + env + ' ' if env else ''}{shlex.join(hand)}",
            "",
        ]
    )


def write_case_artifacts(
    out: Path, share: Path, stage1: QemuSpec, result: dict, commands: list[str], title: str
) -> None:
    """A case dir's files beside the console log: what the guest wrote to the share, the commands, repro.sh,
    layout.svg (titled `title`) and `result` (CaseResult.to_dict()) as result.json."""
    for name in ("kexec-debug.txt", "iomem.txt", "board.dtb"):
        source = share / name
        if source.exists():
            shutil.copyfile(source, out / name)
    (out / "guest-commands.txt").write_text("\n".join(commands) + "\n")
    repro = out / "repro.sh"
    repro.write_text(repro_script(stage1))
    repro.chmod(0o755)
    write_layout_svg(out, result, title)
    write_json_atomic(out / "result.json", result)


def write_layout_svg(out: Path, result: dict, title: str) -> Path | None:
    """layout.svg from a result.json dict: needs the oracle's layout (`predicted.layout`)."""
    predicted = result.get("predicted") or {}
    if not predicted.get("layout"):
        return None
    observed = (result.get("observed") or {}).get("clobbered", [])
    title += f"; oracle {predicted.get('verdict')}"
    if result.get("observed"):
        title += f"; observed {len(observed)} clobbered range{'' if len(observed) == 1 else 's'}"
    path = out / "layout.svg"
    path.write_text(memory_map_svg(predicted["layout"], predicted.get("collisions", []), title, observed))
    return path


def write_replay_svg(out: Path, result: dict) -> Path | None:
    return write_layout_svg(out, result, f"replay on {result['machine']}: {result['verdict']} ({result['phase']})")
