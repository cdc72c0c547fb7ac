"""No QEMU outlives `testbench run`: Ctrl-C, SIGTERM, and even SIGKILL of the runner."""

import os
import signal
import subprocess
import sys
import time

import pytest
from processes import qemu_pids


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
    runner = subprocess.Popen(
        [sys.executable, "-m", "testbench.cli", "run", "--machine", "virt", "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Signal once the guest is really running: QEMU up and the console already talking.
        assert _wait(
            lambda: (
                bool(qemu_pids(out)) and (out / "console.log").exists() and (out / "console.log").stat().st_size > 1000
            ),
            60,
        ), "QEMU never started"
        assert qemu_pids(out)
        runner.send_signal(signum)
        runner.wait(timeout=30)
        assert _wait(lambda: not qemu_pids(out), 10), f"QEMU survived {signum.name}: {qemu_pids(out)}"
        if signum != signal.SIGKILL:
            assert runner.returncode != 0
            assert "Traceback" not in runner.stderr.read()
            assert not (out / "sock").exists(), "sockets left behind"
    finally:
        if runner.poll() is None:
            runner.kill()
        for pid in qemu_pids(out):
            os.kill(pid, signal.SIGKILL)
