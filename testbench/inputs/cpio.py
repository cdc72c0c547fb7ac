"""A cpio "newc" (SVR4, no CRC) writer, the format the kernel unpacks as an initramfs.

Rules that matter to the kernel's unpacker (init/initramfs.c): every header starts on a 4-byte boundary,
the name (with its NUL) and the data are each padded to 4 bytes, numbers are 8 hex digits, parents must
come before their children, and the archive ends with a "TRAILER!!!" entry.
"""

import stat
from dataclasses import dataclass
from typing import BinaryIO

MAGIC = b"070701"
TRAILER = "TRAILER!!!"


def _pad4(length: int) -> bytes:
    return b"\0" * (-length % 4)


@dataclass
class CpioWriter:
    out: BinaryIO
    mtime: int = 0  # fixed, so that the same inputs give the same bytes
    _next_ino: int = 1
    _written: int = 0
    _closed: bool = False

    def _entry(self, name: str, mode: int, data: bytes = b"", nlink: int = 1, rdev: tuple[int, int] = (0, 0)):
        if self._closed:
            raise ValueError("cpio archive already closed")
        name_bytes = name.lstrip("/").encode() + b"\0" if name != TRAILER else name.encode() + b"\0"
        fields = (
            self._next_ino if name != TRAILER else 0,
            mode,
            0,
            0,
            nlink,
            self.mtime,
            len(data),
            0,
            0,
            rdev[0],
            rdev[1],
            len(name_bytes),
            0,
        )
        header = MAGIC + b"".join(b"%08X" % value for value in fields)
        self._next_ino += 1
        chunk = header + name_bytes + _pad4(len(header) + len(name_bytes)) + data + _pad4(len(data))
        self.out.write(chunk)
        self._written += len(chunk)

    def directory(self, name: str, mode: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | mode, nlink=2)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def close(self) -> int:
        """Write the trailer; returns the archive length in bytes."""
        self._entry(TRAILER, 0)
        self._closed = True
        return self._written


def read_cpio(data: bytes) -> list[tuple[str, int, bytes]]:
    """Parse a newc archive into (name, mode, data) entries; used by the tests and by the doctor."""
    return read_cpio_at(data, 0)[0]


def read_cpio_at(data: bytes, offset: int) -> tuple[list[tuple[str, int, bytes]], int]:
    """The entries of the newc archive starting at `offset`, and the offset just past its trailer."""
    entries: list[tuple[str, int, bytes]] = []
    while True:
        if data[offset : offset + 6] != MAGIC:
            raise ValueError(f"bad cpio magic at offset {offset}")
        fields = [int(data[offset + 6 + 8 * i : offset + 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, namesize = fields[1], fields[6], fields[11]
        name_start = offset + 110
        name = data[name_start : name_start + namesize - 1].decode()
        data_start = name_start + namesize + _pad4_len(110 + namesize)
        offset = data_start + filesize + _pad4_len(filesize)
        if name == TRAILER:
            return entries, offset
        entries.append((name, mode, data[data_start : data_start + filesize]))


def _pad4_len(length: int) -> int:
    return -length % 4
