"""More bad input to `testbench run` (issue 7.3): damaged kernels and DTBs, a 64-bit loader, an output dir
that cannot be written or is full, and a QEMU that is too old.

Each case must end with exit code 2, exactly one line on stderr, no traceback and no result.json: a run
refused up front must not leave anything that looks like a result. None of these boots a guest.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbench.inputs.images import Images

KLSZ_TABLE = 0xD4F0  # Debian armmp 6.1: 6, KLSZ, size_ptr 0x531871, bss 0x5e4d4, 0x208000, 0x10000
EM_AARCH64 = 183


def _run(out: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "testbench.cli", "run", "--machine", "virt", "--out", str(out), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def _assert_refused(done: subprocess.CompletedProcess[str], out: Path, *needles: str) -> str:
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    # Nothing half-written presented as a result (out may be a file or a read-only mount: check by path).
    assert not (out / "result.json").exists()
    return lines[0]


@pytest.fixture
def debian_zimage_bytes(images: Images) -> bytes:
    return images.zimage.read_bytes()


def test_truncated_zimage(tmp_path: Path, debian_zimage_bytes: bytes) -> None:
    half = tmp_path / "vmlinuz-half"
    half.write_bytes(debian_zimage_bytes[: len(debian_zimage_bytes) // 2])
    out = tmp_path / "o"
    _assert_refused(_run(out, "--kernel", str(half)), out, "zImage", "file has")


@pytest.mark.parametrize("damage", ["tag-clobbered", "size-ptr-outside", "size-word-absurd"])
def test_zimage_with_corrupt_tag_table(tmp_path: Path, debian_zimage_bytes: bytes, damage: str) -> None:
    raw = bytearray(debian_zimage_bytes)
    # The real table, so the test breaks if the offsets it damages stop being the Debian kernel's.
    assert struct.unpack_from("<2I", raw, KLSZ_TABLE) == (6, 0x5A534C4B)
    if damage == "tag-clobbered":
        raw[KLSZ_TABLE : KLSZ_TABLE + 28] = b"\xa5" * 28  # the whole table, terminator included
    elif damage == "size-ptr-outside":
        struct.pack_into("<I", raw, KLSZ_TABLE + 8, len(raw) + 0x1000)
    else:
        struct.pack_into("<I", raw, KLSZ_TABLE, 0x30)  # 48 words: no KLSZ layout has more than 6
    kernel = tmp_path / "vmlinuz-bad-table"
    kernel.write_bytes(bytes(raw))
    out = tmp_path / "o"
    _assert_refused(_run(out, "--kernel", str(kernel)), out, "corrupt zImage tag table at 0xd4f0")


def test_dtb_of_garbage(tmp_path: Path, images: Images) -> None:
    dtb = tmp_path / "garbage.dtb"
    dtb.write_bytes(bytes(range(256)) * 16)
    out = tmp_path / "o"
    _assert_refused(_run(out, "--dtb", str(dtb)), out, "not a flattened device tree")


def _board_dtb(images: Images) -> bytes:
    return (images.dtb_dir / "vexpress-v2p-ca9.dtb").read_bytes()


def test_dtb_with_magic_but_truncated(tmp_path: Path, images: Images) -> None:
    dtb = tmp_path / "cut.dtb"
    dtb.write_bytes(_board_dtb(images)[:2048])
    out = tmp_path / "o"
    _assert_refused(_run(out, "--dtb", str(dtb)), out, "truncated")


def test_dtb_with_a_good_header_and_a_garbage_body(tmp_path: Path, images: Images) -> None:
    # Header intact (magic, totalsize), structure block overwritten: only a structural check (dtc) sees it;
    # before that check, kexec -l in the guest refused it a whole boot later ("Invalid FDT buffer").
    raw = bytearray(_board_dtb(images))
    off_struct = struct.unpack_from(">I", raw, 8)[0]
    raw[off_struct : off_struct + 64] = b"\xee" * 64
    dtb = tmp_path / "body.dtb"
    dtb.write_bytes(bytes(raw))
    out = tmp_path / "o"
    _assert_refused(_run(out, "--dtb", str(dtb)), out, "corrupt device tree")


def test_arm64_kexec(tmp_path: Path, images: Images) -> None:
    # A minimal but well-formed ELF64 little-endian executable header for AArch64, no program headers.
    header = bytearray(64)
    header[:7] = b"\x7fELF\x02\x01\x01"
    struct.pack_into("<HHIQQQIHHHHHH", header, 16, 2, EM_AARCH64, 1, 0x400000, 64, 0, 0, 64, 56, 0, 64, 0, 0)
    kexec = tmp_path / "kexec-arm64"
    kexec.write_bytes(bytes(header))
    out = tmp_path / "o"
    _assert_refused(_run(out, "--kexec", str(kexec)), out, "EM_AARCH64", "not 32-bit ARM")


@contextlib.contextmanager
def _tmpfs(where: Path, options: str) -> Iterator[Path]:
    """A private tmpfs mount. Tests run as root, so mode bits (chmod 0o555) do not stop writes: only a
    read-only or full filesystem really fails for root."""
    where.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, f"tb-{uuid.uuid4().hex[:8]}", str(where)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_read_only_output_dir(tmp_path: Path, images: Images) -> None:
    with _tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        out = ro / "case"
        _assert_refused(_run(out), out, "output dir", "Read-only file system")


def test_output_dir_is_a_file(tmp_path: Path, images: Images) -> None:
    # The other way root's writes fail: something that is not a directory sits where the dir should be.
    out = tmp_path / "o"
    out.write_text("not a directory\n")
    _assert_refused(_run(out), out, "output dir", "cannot write")
    assert out.read_text() == "not a directory\n"


def test_full_output_dir(tmp_path: Path, images: Images) -> None:
    with _tmpfs(tmp_path / "full", "size=64k") as full:
        out = full / "case"
        _assert_refused(_run(out), out, "output dir", "free")
        assert not (out / "share").exists(), "half a share was built before the space check"


def test_qemu_too_old(tmp_path: Path, images: Images) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "qemu-system-arm"
    fake.write_text('#!/bin/sh\necho "QEMU emulator version 5.2.0 (Debian 1:5.2+dfsg-11+deb11u3)"\n')
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    assert shutil.which("qemu-system-arm", path=env["PATH"]) == str(fake)
    out = tmp_path / "o"
    _assert_refused(_run(out, env=env), out, "5.2", "too old")


def test_qemu_not_runnable(tmp_path: Path, images: Images) -> None:
    # An executable that the kernel cannot exec (no interpreter): a broken install, still one clear line.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "qemu-system-arm"
    fake.write_text("#!/nonexistent/interpreter\n")
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    out = tmp_path / "o"
    _assert_refused(_run(out, env=env), out, "qemu-system-arm")
