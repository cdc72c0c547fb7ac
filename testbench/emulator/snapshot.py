"""Stage-1 snapshots: boot a machine profile once, save it with QMP migration, restore each case from it.

A stage-1 boot costs ~5 s of TCG time per case; restoring the saved state takes ~0.1 s. The state is saved
at the stage-1 shell prompt with nothing mounted, because a mounted 9p share blocks migration. The 9p
device's host path is configuration, not migrated state, so each restored case brings its own share.

The key covers everything that shapes the saved guest: QEMU's version and hand-run command line (machine,
CPU, RAM, kernel, initrd, DTB, append, devices), the sha256 of every file on it, and the board's
environment. The first case of a profile boots normally, saves, and carries on from the same QEMU;
concurrent cases of that profile wait on a lock instead of booting too.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

from ..deadlines import budget
from ..errors import BenchError
from ..fileio import sha256_file
from ..inputs.images import cache_dir
from .qemu import QemuProcess, QemuSpec, qemu_args

FORMAT = 1  # bump when what the stage-1 shell has done before the save changes
STATE_FILE = "stage1.state"
SHARE_PLACEHOLDER = Path("/SHARE")


class SnapshotBroken(BenchError):
    """A saved state that QEMU would not restore: the caller drops it and boots instead."""


def snapshot_root() -> Path:
    return cache_dir() / "snapshots"


def snapshot_key(spec: QemuSpec, qemu_version: str) -> str:
    args = qemu_args(replace(spec, share=None if spec.share is None else SHARE_PLACEHOLDER), None)
    files = [p for p in (spec.kernel, spec.initrd, spec.dtb) if p is not None]
    identity = {
        "format": FORMAT,
        "qemu": qemu_version,
        "args": args,
        "env": sorted(spec.machine.env),
        "files": [sha256_file(p) for p in files],
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


@dataclass
class Slot:
    """One profile's snapshot: `ready` to restore, or claimed (lock held) for this process to make."""

    key: str
    directory: Path
    lock_fd: int | None = None

    @property
    def state(self) -> Path:
        return self.directory / STATE_FILE

    @property
    def ready(self) -> bool:
        return self.lock_fd is None and self.state.is_file()

    def release(self) -> None:
        if self.lock_fd is not None:
            os.close(self.lock_fd)  # closing drops the flock
            self.lock_fd = None

    def save(self, qemu: QemuProcess, boot_seconds: float) -> float:
        """Save the running stage 1 (at its prompt, nothing mounted) into the cache and leave it paused;
        returns the seconds the save took. A failed save is only a missed speed-up: say so, carry on."""
        assert qemu.qmp is not None and self.lock_fd is not None
        t0 = time.monotonic()
        work = self.directory.with_name(f".{self.key}.{os.getpid()}")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        try:
            # The default bandwidth cap (128 MiB/s) is for live migration between hosts; a file wants none.
            qemu.qmp.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
            qemu.qmp.cmd("migrate", uri=f"exec:cat > {work / STATE_FILE}")
            deadline = time.monotonic() + budget("snapshot_save")
            while True:
                status = _qmp_dict(qemu.qmp.cmd("query-migrate"))
                if status.get("status") == "completed":
                    break
                if status.get("status") in ("failed", "cancelled") or time.monotonic() > deadline:
                    raise BenchError(f"saving the stage-1 snapshot failed: {status.get('error-desc', status)}")
                time.sleep(0.02)
            seconds = time.monotonic() - t0
            (work / "meta.json").write_text(
                json.dumps(
                    {
                        "key": self.key,
                        "machine": qemu.spec.machine.name,
                        "ram": qemu.spec.ram,
                        "boot_seconds": round(boot_seconds, 3),
                        "save_seconds": round(seconds, 3),
                        "qemu_cmdline": qemu_args(replace(qemu.spec, share=SHARE_PLACEHOLDER), None),
                    },
                    indent=1,
                )
                + "\n"
            )
            shutil.rmtree(self.directory, ignore_errors=True)
            work.rename(self.directory)
            return seconds
        finally:
            shutil.rmtree(work, ignore_errors=True)
            self.release()

    def drop(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def claim(spec: QemuSpec, qemu_version: str, say=lambda s: None) -> Slot:
    """The snapshot for `spec`: ready, or claimed for the caller to make (then call `save` or `release`)."""
    root = snapshot_root()
    root.mkdir(parents=True, exist_ok=True)
    key = snapshot_key(spec, qemu_version)
    slot = Slot(key, root / key)
    if slot.ready:
        return slot
    fd = os.open(root / f"{key}.lock", os.O_CREAT | os.O_RDWR, 0o644)
    deadline = time.monotonic() + budget("snapshot_lock")
    told = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if not told:
                say("boot1: another case is booting this profile for its snapshot; waiting for it")
                told = True
            if time.monotonic() > deadline:
                os.close(fd)
                return slot  # not ready and not ours: the caller boots without a snapshot
            time.sleep(0.1)
    if slot.state.is_file():  # made while we waited
        os.close(fd)
        return slot
    slot.lock_fd = fd
    return slot


def _qmp_dict(reply: object) -> dict:
    """QMP's query replies are JSON objects; the client library types them as `object`."""
    if not isinstance(reply, dict):
        raise BenchError(f"QMP answered {reply!r} where an object was due")
    return reply


def wait_restored(qemu: QemuProcess) -> float:
    """Wait until the -incoming restore is done (the VM then sits paused); returns its seconds."""
    assert qemu.qmp is not None
    t0 = time.monotonic()
    while True:
        if not qemu.running():
            raise SnapshotBroken(f"QEMU exited while restoring the stage-1 snapshot: {qemu.stderr_tail()}")
        status = "inmigrate"
        with contextlib.suppress(Exception):  # QEMU may be going down: the next round says so
            status = _qmp_dict(qemu.qmp.cmd("query-status"))["status"]
        if status == "paused":
            return time.monotonic() - t0
        if status not in ("inmigrate", "prelaunch"):
            raise SnapshotBroken(f"after restoring the stage-1 snapshot QEMU is {status!r}")
        if time.monotonic() - t0 > budget("snapshot_restore"):
            raise SnapshotBroken(f"restoring the stage-1 snapshot took over {budget('snapshot_restore'):.0f}s")
        time.sleep(0.01)
