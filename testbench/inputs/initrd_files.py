"""What an initramfs unpacks to: the bytes of its regular files, which the crash kernel's rootfs (tmpfs)
must hold (oracle/crash_memory.py).

An initramfs is cpio "newc" archives back to back, each raw or compressed, with zero padding between them
(init/initramfs.c unpack_to_rootfs). Python's standard library reads gzip, xz, lzma and bzip2; a zstd or
lz4 archive is refused with a way round it.
"""

from __future__ import annotations

import bz2
import lzma
import stat
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import UserError
from .cpio import MAGIC, read_cpio_at

_DECOMPRESSORS: dict[bytes, Callable[[], Any]] = {  # magic -> a decompressor with decompress(), unused_data
    b"\x1f\x8b": lambda: zlib.decompressobj(31),
    b"\xfd7zXZ\x00": lambda: lzma.LZMADecompressor(lzma.FORMAT_XZ),
    b"\x5d\x00\x00": lambda: lzma.LZMADecompressor(lzma.FORMAT_ALONE),
    b"BZh": bz2.BZ2Decompressor,
}
_REFUSED = {b"\x28\xb5\x2f\xfd": "zstd", b"\x02\x21\x4c\x18": "lz4", b"\x89LZO": "lzo"}


def file_sizes(data: bytes) -> list[int]:
    """The sizes of every regular file the archives in `data` unpack, in order."""
    sizes: list[int] = []
    offset = 0
    while offset < len(data):
        if data[offset] == 0:  # padding between archives
            offset += 1
            continue
        head = data[offset : offset + 6]
        if head == MAGIC:
            entries, offset = read_cpio_at(data, offset)
            sizes += [len(body) for _, mode, body in entries if stat.S_ISREG(mode)]
            continue
        for magic, make in _DECOMPRESSORS.items():
            if head.startswith(magic):
                d = make()
                inner = d.decompress(data[offset:])
                sizes += file_sizes(inner)
                offset = len(data) - len(d.unused_data)
                break
        else:
            name = next((n for m, n in _REFUSED.items() if head.startswith(m)), None)
            what = f"a {name} archive, which Python cannot unpack" if name else f"{head.hex()}, no cpio archive"
            raise ValueError(f"offset {offset} holds {what}")
    return sizes


def initrd_file_sizes(path: Path) -> list[int]:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UserError(f"initrd {path}: {err.strerror}") from None
    try:
        return file_sizes(data)
    except (ValueError, zlib.error, lzma.LZMAError, OSError, EOFError) as err:
        raise UserError(
            f"initrd {path}: cannot tell what it unpacks to ({err}); give --initrd-size instead (its files are "
            "then taken as the archive's size)"
        ) from None
