"""No QEMU outlives `testbench run`: Ctrl-C, SIGTERM, and even SIGKILL of the runner."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _qemu_pids(marker: Path) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"qemu-system-arm.*{marker}"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _wait(predicate, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_qemu_dies_with_the_runner(tmp_path, images, signum):
    out = tmp_path / "case"
    runner = subprocess.Popen([sys.executable, "-m", "testbench.cli", "run", "--machine", "virt", "--out", str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Signal once the guest is really running: QEMU up and the console already talking.
        assert _wait(lambda: bool(_qemu_pids(out)) and (out / "console.log").exists()
                     and (out / "console.log").stat().st_size > 1000, 60), "QEMU never started"
        assert _qemu_pids(out)
        runner.send_signal(signum)
        runner.wait(timeout=30)
        assert _wait(lambda: not _qemu_pids(out), 10), f"QEMU survived {signum.name}: {_qemu_pids(out)}"
        if signum != signal.SIGKILL:
            assert runner.returncode != 0
            assert "Traceback" not in runner.stderr.read()
            assert not (out / "sock").exists(), "sockets left behind"
    finally:
        if runner.poll() is None:
            runner.kill()
        for pid in _qemu_pids(out):
            subprocess.run(["kill", "-9", str(pid)])
