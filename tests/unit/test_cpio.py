"""The cpio newc writer against the rules the kernel's unpacker and GNU cpio apply."""

import shutil
import stat
import subprocess
from io import BytesIO

import pytest

from testbench.inputs.cpio import CpioWriter, read_cpio


def _archive() -> bytes:
    out = BytesIO()
    writer = CpioWriter(out)
    writer.directory("bin")
    writer.file("bin/busybox", b"\x7fELF" + b"x" * 1001, 0o755)  # odd length: data padding matters
    writer.symlink("bin/sh", "busybox")
    writer.char_device("dev/console", 5, 1)
    writer.file("init", b"#!/bin/sh\n", 0o755)
    writer.close()
    return out.getvalue()


def test_every_header_is_4_byte_aligned_and_uses_newc_magic():
    data = _archive()
    offsets = [i for i in range(0, len(data), 4) if data[i : i + 6] == b"070701"]
    # 5 entries + trailer, every one on a 4-byte boundary (the kernel rejects anything else).
    assert len(offsets) == 6
    assert data.endswith(b"\0") and len(data) % 4 == 0


def test_trailer_is_last_and_names_have_no_leading_slash():
    out = BytesIO()
    writer = CpioWriter(out)
    writer.file("/etc/x", b"1")
    writer.close()
    data = out.getvalue()
    assert b"/etc/x" not in data and b"etc/x\0" in data
    assert data.rstrip(b"\0").endswith(b"TRAILER!!!")


def test_round_trip_through_our_reader():
    entries = {name: (mode, body) for name, mode, body in read_cpio(_archive())}
    assert entries["bin/busybox"][1] == b"\x7fELF" + b"x" * 1001
    assert stat.S_ISLNK(entries["bin/sh"][0]) and entries["bin/sh"][1] == b"busybox"
    assert stat.S_ISCHR(entries["dev/console"][0])
    assert stat.S_IMODE(entries["init"][0]) == 0o755


@pytest.mark.skipif(shutil.which("cpio") is None, reason="GNU cpio not installed (apt-get install cpio)")
def test_gnu_cpio_lists_and_extracts_the_archive(tmp_path):
    data = _archive()
    listing = subprocess.run(["cpio", "-t", "-v"], input=data, capture_output=True, check=True).stdout.decode()
    names = [line.split()[-1] if "->" not in line else line.split()[-3] for line in listing.splitlines()]
    assert names == ["bin", "bin/busybox", "bin/sh", "dev/console", "init"]
    subprocess.run(
        ["cpio", "-i", "-d", "--quiet", "--no-absolute-filenames", "bin/busybox", "init"],
        input=data,
        cwd=tmp_path,
        check=True,
    )
    assert (tmp_path / "bin/busybox").read_bytes() == b"\x7fELF" + b"x" * 1001
    assert (tmp_path / "init").stat().st_mode & 0o111


def test_writing_after_close_is_refused():
    writer = CpioWriter(BytesIO())
    writer.close()
    with pytest.raises(ValueError):
        writer.file("late", b"")
