"""Bad input to `testbench run`: one clear line on stderr, exit code 2, no traceback, no QEMU left behind."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "testbench.cli", "run", *args], capture_output=True, text=True, env=env, timeout=120
    )


def _assert_clean_error(done: subprocess.CompletedProcess, *needles: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def x86_binary() -> Path:
    return Path(sys.executable).resolve()  # whatever runs the tests is not a 32-bit ARM program


def test_missing_kernel_file(tmp_path):
    _assert_clean_error(
        _run("--machine", "virt", "--kernel", str(tmp_path / "nope"), "--out", str(tmp_path / "o")), "no such file"
    )


def test_kernel_that_is_not_a_zimage(tmp_path):
    bogus = tmp_path / "vmlinuz"
    bogus.write_bytes(os.urandom(4096))
    _assert_clean_error(_run("--machine", "virt", "--kernel", str(bogus), "--out", str(tmp_path / "o")), "zImage")


def test_kexec_that_is_not_arm(tmp_path, x86_binary):
    _assert_clean_error(
        _run("--machine", "virt", "--kexec", str(x86_binary), "--out", str(tmp_path / "o")), "not 32-bit ARM"
    )


def test_kexec_that_is_not_elf(tmp_path):
    script = tmp_path / "kexec"
    script.write_text("#!/bin/sh\necho hi\n")
    _assert_clean_error(_run("--machine", "virt", "--kexec", str(script), "--out", str(tmp_path / "o")), "not an ELF")


def test_ram_above_machine_maximum(tmp_path):
    _assert_clean_error(
        _run("--machine", "vexpress-a9", "--ram", "2G", "--out", str(tmp_path / "o")), "vexpress-a9", "maximum"
    )


def test_unknown_machine(tmp_path):
    _assert_clean_error(_run("--machine", "raspi9", "--out", str(tmp_path / "o")), "unknown machine")


def test_initrd_bigger_than_ram(tmp_path):
    _assert_clean_error(
        _run("--machine", "virt", "--ram", "256M", "--initrd-size", "300M", "--out", str(tmp_path / "o")),
        "does not fit",
    )


def test_unreadable_size(tmp_path):
    _assert_clean_error(_run("--machine", "virt", "--ram", "lots", "--out", str(tmp_path / "o")), "--ram")


def test_qemu_missing(tmp_path):
    # A PATH with python but without qemu-system-arm.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("apt-cache", "dpkg-deb"):
        if shutil.which(tool):
            (bindir / tool).symlink_to(shutil.which(tool))
    env = dict(os.environ, PATH=str(bindir))
    _assert_clean_error(_run("--machine", "virt", "--out", str(tmp_path / "o"), env=env), "qemu-system-arm not found")


def test_offline_with_missing_cache(tmp_path):
    env = dict(os.environ, TESTBENCH_OFFLINE="1", TESTBENCH_CACHE=str(tmp_path / "empty-cache"))
    _assert_clean_error(
        _run("--machine", "virt", "--out", str(tmp_path / "o"), env=env), "no bookworm images in the cache"
    )
