"""Which QEMU processes are still alive for a case, read from /proc (procps' pgrep is not on a fresh
machine: a minbase Debian root has no procps)."""

from __future__ import annotations

from pathlib import Path


def qemu_pids(marker: Path) -> list[int]:
    """PIDs of live qemu-system-arm processes whose command line names MARKER (a case's own path)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:  # gone while we looked
            continue
        if state != "Z" and argv and argv[0].endswith(b"qemu-system-arm") and str(marker).encode() in b" ".join(argv):
            pids.append(int(entry.name))
    return pids
