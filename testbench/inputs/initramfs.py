"""Build the two guest initramfs images from the image cache, in Python.

Stage 1 holds busybox, the virtio-mmio + 9p modules and an init that gives a shell. Stage 2 holds busybox,
an init that prints the JSON marker, and a payload of a chosen size that is deterministic from a seed. The
payload goes into a second, uncompressed cpio appended to the gzip one: the kernel accepts concatenated
archives, and random bytes would not compress anyway.
"""

import gzip
import hashlib
import io
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..datafiles import data_path
from ..errors import BenchError
from ..fileio import sha256_file, write_atomic
from .cpio import CpioWriter
from .images import Images

RECIPES = data_path()
PAYLOAD_NAME = "payload.bin"
# Kernel rule: a cpio appended after a compressed one must start 4-byte aligned; 512 keeps tools happy too.
ARCHIVE_ALIGN = 512


def _recipe(*parts: str) -> Path:
    path = RECIPES.joinpath(*parts)
    if not path.exists():
        raise BenchError(f"recipe {path} is missing: testbench must run from its source checkout")
    return path


def module_load_order(modules_dir: Path, wanted: list[str]) -> list[str]:
    """Paths (relative to modules_dir) of `wanted` modules and their dependencies, dependencies first."""
    dep_file = modules_dir / "modules.dep"
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in dep_file.read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        by_name[Path(path).name.split(".ko")[0].replace("-", "_")] = path
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for dep in deps.get(path, []):
            visit(dep)
        order.append(path)

    for name in wanted:
        key = name.replace("-", "_")
        if key not in by_name:
            raise BenchError(f"module {name} is not in {dep_file}")
        visit(by_name[key])
    return order


def _base_entries(writer: CpioWriter, busybox: Path, init: Path) -> None:
    for directory in ("bin", "dev", "proc", "sys", "mnt", "tmp", "etc", "lib"):
        writer.directory(directory)
    # Without /dev/console in the archive the kernel cannot give init a console at all.
    writer.char_device("dev/console", 5, 1)
    writer.file("bin/busybox", busybox.read_bytes(), 0o755)
    writer.symlink("bin/sh", "busybox")
    writer.file("init", init.read_bytes(), 0o755)


def _parent_dirs(writer: CpioWriter, root: str, rel: str, made: set[str]) -> None:
    """The directories above ROOT/REL that this archive does not have yet (newc has no implicit parents)."""
    parts = Path(rel).parts[:-1]
    for depth in range(1, len(parts) + 1):
        directory = "/".join(parts[:depth])
        if directory not in made:
            writer.directory(f"{root}/{directory}")
            made.add(directory)


def _cached(images: Images, kind: str, key_parts: list[bytes], build) -> Path:
    key = hashlib.sha256(b"\0".join(key_parts)).hexdigest()[:20]
    out_dir = images.root / "initramfs"
    out_dir.mkdir(exist_ok=True)
    target = out_dir / f"{kind}-{key}.cpio.gz"
    if not target.exists():
        raw = io.BytesIO()
        build(CpioWriter(raw))
        write_atomic(target, gzip.compress(raw.getvalue(), compresslevel=6, mtime=0))
    return target


def stage1_initramfs(images: Images) -> Path:
    init = _recipe("stage1", "init")
    put = _recipe("stage1", "tb-put")  # sends files back over the console (emulator/share.py)
    wanted = [
        ln.strip()
        for ln in _recipe("stage1", "modules.txt").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    order = module_load_order(images.modules_dir, wanted)

    def build(writer: CpioWriter) -> None:
        _base_entries(writer, images.busybox, init)
        made: set[str] = set()
        writer.directory("lib/modules")
        for rel in order:
            _parent_dirs(writer, "lib/modules", rel, made)
            writer.file(f"lib/modules/{rel}", (images.modules_dir / rel).read_bytes())
        writer.file("etc/modules.load", ("\n".join(order) + "\n").encode())
        writer.file("bin/tb-put", put.read_bytes(), 0o755)
        writer.close()

    key = [
        images.package(images.kernel_package).sha256.encode(),
        images.package("busybox-static").sha256.encode(),
        init.read_bytes(),
        "\n".join(order).encode(),
        put.read_bytes(),
    ]
    return _cached(images, "stage1", key, build)


def share_initramfs(images: Images, stage1: Path, files: dict[str, Path]) -> Path:
    """The stage-1 initramfs with the share appended as a second, uncompressed cpio: `files` (path below
    /mnt -> host file) land in the guest's /mnt (emulator/share.py, the `initramfs` transport). Built once
    per content into the image cache, so cases with the same files boot the same image and share its
    stage-1 snapshot."""
    entries = sorted(files.items())
    key = hashlib.sha256(stage1.name.encode())
    for name, path in entries:
        key.update(b"\0%s\0%o\0%s" % (name.encode(), path.stat().st_mode & 0o777, sha256_file(path).encode()))
    out_dir = images.root / "initramfs"
    target = out_dir / f"stage1-share-{key.hexdigest()[:20]}.img"
    if target.exists():
        return target
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".build-")
    try:
        with os.fdopen(fd, "wb") as handle:
            base = stage1.read_bytes()
            handle.write(base + b"\0" * (-len(base) % ARCHIVE_ALIGN))
            writer = CpioWriter(handle)
            made: set[str] = set()
            for name, path in entries:
                _parent_dirs(writer, "mnt", name, made)
                writer.file(f"mnt/{name}", path.read_bytes(), path.stat().st_mode & 0o777)
            writer.close()
        os.chmod(tmp, 0o444)  # as the stage-2 initrds: shared, never written in place
        os.replace(tmp, target)  # atomic, so concurrent cases never boot half an image
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def stage2_base(images: Images) -> Path:
    init = _recipe("stage2", "init")

    def build(writer: CpioWriter) -> None:
        _base_entries(writer, images.busybox, init)
        writer.close()

    return _cached(images, "stage2", [images.package("busybox-static").sha256.encode(), init.read_bytes()], build)


def payload_bytes(size: int, seed: int) -> bytes:
    """Deterministic pseudo-random payload: SHAKE-256 of the seed, so any tool can regenerate it."""
    return hashlib.shake_256(b"testbench-payload-%d" % seed).digest(size)


@dataclass(frozen=True)
class Stage2Initrd:
    path: Path
    size: int
    payload_size: int
    payload_sha256: str
    seed: int


def build_stage2_initrd(images: Images, out: Path, payload_size: int, seed: int = 1) -> Stage2Initrd:
    base = stage2_base(images).read_bytes()
    payload = payload_bytes(payload_size, seed)
    with out.open("wb") as handle:
        handle.write(base)
        handle.write(b"\0" * (-len(base) % ARCHIVE_ALIGN))
        writer = CpioWriter(handle)
        writer.file(PAYLOAD_NAME, payload)
        writer.close()
    return Stage2Initrd(
        path=out,
        size=out.stat().st_size,
        payload_size=payload_size,
        payload_sha256=hashlib.sha256(payload).hexdigest(),
        seed=seed,
    )


def cached_stage2_initrd(images: Images, payload_size: int, seed: int = 1) -> Stage2Initrd:
    """The stage-2 initrd for (size, seed), built once into the image cache. Cases hard-link it into their
    share: a matrix writes a 100 MB initrd per cell otherwise, and generating it costs time as well."""
    base = stage2_base(images)
    out_dir = images.root / "initramfs"
    stem = f"stage2-initrd-{base.name.removeprefix('stage2-').removesuffix('.cpio.gz')}-{payload_size}-{seed}"
    target, facts = out_dir / f"{stem}.img", out_dir / f"{stem}.json"
    if target.exists() and facts.exists():
        known = json.loads(facts.read_text())
        if known.get("size") == target.stat().st_size:
            return Stage2Initrd(
                path=target,
                size=known["size"],
                payload_size=payload_size,
                payload_sha256=known["payload_sha256"],
                seed=seed,
            )
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".build-")
    os.close(fd)
    try:
        built = build_stage2_initrd(images, Path(tmp), payload_size, seed)
        os.chmod(tmp, 0o444)  # shared through hard links: nothing may write it in place
        # Facts first: an image is only trusted with its facts beside it.
        write_atomic(facts, (json.dumps({"size": built.size, "payload_sha256": built.payload_sha256}) + "\n").encode())
        os.replace(tmp, target)  # atomic, so concurrent runs never see half an image
    finally:
        Path(tmp).unlink(missing_ok=True)
    return Stage2Initrd(
        path=target, size=built.size, payload_size=payload_size, payload_sha256=built.payload_sha256, seed=seed
    )
