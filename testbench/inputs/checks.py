"""Check and describe the files a case uses: the zImage, the initrd, the DTB and the kexec loader.

Every check fails with one UserError line; every accepted file is described by an Input with its sha256,
so result.json says exactly what ran.
"""

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from ..errors import UserError
from ..fileio import sha256_file
from . import dtb
from .images import Images

FDT_MAGIC = b"\xd0\x0d\xfe\xed"


@dataclass(frozen=True)
class Input:
    role: str
    path: Path
    sha256: str
    size: int
    version: str | None = None

    def to_dict(self) -> dict:
        return {"path": str(self.path), "sha256": self.sha256, "size": self.size, "version": self.version}


def describe(role: str, path: Path, version: str | None = None) -> Input:
    return Input(role, path, sha256_file(path), path.stat().st_size, version)


def existing_file(path: Path, role: str) -> Path:
    if not path.exists():
        raise UserError(f"{role} {path}: no such file")
    if not path.is_file():
        raise UserError(f"{role} {path}: not a regular file")
    if not os.access(path, os.R_OK):
        raise UserError(f"{role} {path}: not readable")
    return path


def check_dtb(path: Path) -> Path:
    """A DTB kexec will accept: magic, a totalsize the file holds, and a structure libfdt can walk.

    The header checks give the common mistakes a precise message; the walk over every node and property
    (dtb.check) then refuses a blob with a good header and a garbage body here, not in `kexec -l` in the
    guest ("Invalid FDT buffer") a boot later.
    """
    existing_file(path, "dtb")
    data = path.read_bytes()
    if data[:4] != FDT_MAGIC:
        raise UserError(f"dtb {path}: not a flattened device tree (no magic d00dfeed)")
    if len(data) < 8 or int.from_bytes(data[4:8], "big") > len(data):
        raise UserError(f"dtb {path}: truncated (header totalsize exceeds the file)")
    try:
        dtb.check(data)
    except dtb.DtbError as err:
        raise UserError(f"dtb {path}: corrupt device tree ({err})") from None
    return path


@dataclass(frozen=True)
class Loader:
    """A kexec binary and how to run it in the guest (through Debian's ld.so when it is dynamic)."""

    binary: Path
    dynamic: bool
    version: str | None


def check_kexec(path: Path) -> Loader:
    existing_file(path, "kexec")
    try:
        with path.open("rb") as handle:
            elf = ELFFile(handle)
            machine, elfclass = elf["e_machine"], elf.elfclass
            dynamic = any(seg["p_type"] == "PT_INTERP" for seg in elf.iter_segments())
    except ELFError:
        raise UserError(f"kexec {path}: not an ELF executable") from None
    if machine != "EM_ARM" or elfclass != 32:
        raise UserError(f"kexec {path}: built for {machine} ({elfclass}-bit), not 32-bit ARM; the guest cannot run it")
    return Loader(path, dynamic, None)


def loader_bundle(images: Images) -> Path:
    """Debian's kexec plus its shared libraries flattened into one dir (cached): the guest runs it as
    `ld-linux-armhf.so.3 --library-path DIR kexec`, with no install into the initramfs."""
    kexec_sha = images.package("kexec-tools").sha256
    target = images.root / "loader" / kexec_sha[:20]
    if target.is_dir():
        return target
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "lib").mkdir(parents=True)
    shutil.copy2(images.kexec, tmp / "kexec")
    for tree in images.library_trees():
        for libdir in ("lib", "lib/arm-linux-gnueabihf", "usr/lib", "usr/lib/arm-linux-gnueabihf"):
            base = tree / libdir
            if not base.is_dir():
                continue
            for entry in base.iterdir():
                if ".so" not in entry.name:
                    continue
                source = entry
                if entry.is_symlink():
                    link = os.readlink(entry)
                    # Debian's links are absolute in the target's root: resolve them inside the tree.
                    source = tree / link.lstrip("/") if link.startswith("/") else entry.parent / link
                if source.is_file():
                    shutil.copyfile(source, tmp / "lib" / entry.name)
                    # ld-linux-armhf.so.3 is run as a program, so every copied object keeps exec rights.
                    (tmp / "lib" / entry.name).chmod(0o755)
    try:
        os.replace(tmp, target)
    except OSError:  # another process won the race; theirs is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)
    return target
