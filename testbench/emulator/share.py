"""How a case's files reach stage 1, and how the files the guest writes come back, per transport kind
(machines.toml `share`, chosen per board and QEMU version by Machine.transport).

* virtio-9p-device (virtio-mmio) and virtio-9p-pci (the board's PCIe): the case's share dir is a 9p export
  the guest mounts read-write at /mnt.
* initramfs: the board has no virtio transport. The files travel in a second newc cpio appended to the
  stage-1 initramfs (inputs/initramfs.py), which the kernel unpacks into /mnt; what the guest writes comes
  back over the console: the stage-1 initramfs's `tb-put FILE...` prints each file gzipped and base64
  encoded between marker lines, and the Shell (guest.py) writes it into the share dir on the host.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import hashlib
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

from ..errors import BenchError

SHARE_TAG = "tbshare"
GUEST_SHARE = "/mnt"
NINEP_MOUNT = "mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,cache=mmap"


@dataclass(frozen=True)
class ShareKind:
    device: str | None  # the QEMU -device that exports the share dir over 9p; None: no device at all
    writable: bool  # the guest writes straight into the host's share dir; else tb-put sends files back

    @property
    def in_initramfs(self) -> bool:
        return self.device is None


KINDS = {
    "virtio-9p-device": ShareKind("virtio-9p-device", True),
    "virtio-9p-pci": ShareKind("virtio-9p-pci", True),
    "initramfs": ShareKind(None, False),
}


def share_kind(kind: str) -> ShareKind:
    return KINDS[kind]


def qemu_share_args(kind: str, share: Path) -> list[str]:
    device = KINDS[kind].device
    if device is None:
        return []
    return [
        "-fsdev",
        f"local,id=tbfs,path={share},security_model=none",
        "-device",
        f"{device},fsdev=tbfs,mount_tag={SHARE_TAG}",
    ]


def mount_command(kind: str) -> str | None:
    """What makes the share appear at /mnt in stage 1 (None: it is already there, from the initramfs)."""
    if KINDS[kind].device is None:
        return None
    # cache=mmap: kexec-tools mmaps the initrd, and without a page cache every 4 KiB fault is its own 9p
    # read (a 100 MB initrd took 13 s to load instead of 2.5 s). Plain reads and writes stay uncached, so
    # what the guest writes to the share is on the host when the command returns.
    return f"{NINEP_MOUNT} {SHARE_TAG} {GUEST_SHARE}"


def send_back(kind: str, *names: str) -> list[str]:
    """The command that brings the guest's files `names` (in /mnt) to the host, if the share needs one."""
    if KINDS[kind].writable or not names:
        return []
    return ["tb-put " + " ".join(f"{GUEST_SHARE}/{n}" for n in names)]


# What tb-put (data/stage1/tb-put) prints per file: a header line with the name, size and sha256, the gzip
# stream in base64 lines, an end line.
FRAME = re.compile(r"^TBPUT (\S+) (\d+) ([0-9a-f]{64})\n(.*?)^TBPUT-END\n", re.MULTILINE | re.DOTALL)


def receive(output: str, into: Path) -> str:
    """Write every file framed in a command's console `output` into `into`; returns the output without
    the frames. A frame that does not decode to its announced size and sha256 is a bench failure."""
    for match in FRAME.finditer(output):
        name, size, digest, body = match.group(1), int(match.group(2)), match.group(3), match.group(4)
        if "/" in name or name in (".", ".."):
            raise BenchError(f"stage 1 sent back a file named {name!r}")
        try:
            data = gzip.decompress(base64.b64decode("".join(body.split()), validate=True))
        except (binascii.Error, OSError, EOFError, zlib.error) as err:
            raise BenchError(f"stage 1 sent {name} back over the console garbled ({err})") from None
        if len(data) != size or hashlib.sha256(data).hexdigest() != digest:
            raise BenchError(
                f"stage 1 sent {name} back over the console garbled: {len(data)} bytes, "
                f"sha256 {hashlib.sha256(data).hexdigest()[:12]}, announced {size} bytes, sha256 {digest[:12]}"
            )
        (into / name).write_bytes(data)
    return FRAME.sub("", output)
