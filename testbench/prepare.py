"""Before a case runs: every input checked and the case dir's share laid out (`prepare_case`), and the
commands the bench will type in the stage-1 shell (`guest_commands`). Nothing here starts QEMU."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path

from .datafiles import data_path
from .emulator.qemu import SHARE_TAG, QemuSpec, qemu_binary
from .errors import BenchError, UserError
from .fileio import sha256_file
from .inputs.checks import Input, Loader, check_dtb, check_kexec, describe, existing_file, loader_bundle
from .inputs.images import Images
from .inputs.initramfs import cached_stage2_initrd, stage1_initramfs
from .inputs.memmap import PLAIN, dump_qemu_dtb, get_memmap, stage1_dtb
from .inputs.zimage import ZImage, read_zimage
from .machines import Machine
from .verdict import UNTIL

GUEST_SHARE = "/mnt"
# Beyond the kernel and the initrd, a case dir holds the loader bundle (~6 MiB), logs and dumps.
OUT_DIR_SLACK = 32 << 20


@dataclass(frozen=True)
class CaseRequest:
    machine: Machine
    ram: int
    out: Path
    kernel: Path | None = None  # None: Debian's kernel from the image cache
    initrd: Path | None = None  # None: a generated stage-2 initrd with a payload of initrd_size bytes
    initrd_size: int = 1 << 20
    seed: int = 1
    dtb: Path | None = None  # None: the DTB the first kernel booted with (/sys/firmware/fdt)
    kexec: Path | None = None  # None: Debian's kexec-tools
    kexec_args: tuple[str, ...] = ()
    gdb: bool = False  # a user's debugger will attach: no deadlines
    observe: bool = True  # stop at zImage and kernel entry via the gdbstub, dump and diff every segment
    snapshot: bool = True  # restore stage 1 from its saved state (snapshot.py) instead of booting it
    until: str = "init"  # "kernel-entry": a layout verdict from the ground truth alone, no stage-2 boot
    memmap: str = PLAIN  # a RAM map from images/memmaps.toml: holes stage 1's DTB gives kexec to work around

    @property
    def observing(self) -> bool:
        return self.observe or self.until == "kernel-entry"

    @property
    def stage2_cmdline(self) -> str:
        return " ".join([f"console={self.machine.console}", *self.machine.stage2_cmdline, "panic=-1"])


@dataclass(frozen=True)
class PreparedCase:
    request: CaseRequest
    share: Path
    stage1: QemuSpec
    zimage: ZImage
    loader: Loader
    inputs: dict[str, Input]
    payload_sha256: str | None
    kexec_command: str
    image_set: dict  # Images.provenance(): the Debian suite, its lock and any drift from it
    kexec_family: str | None = None  # the oracle's rule family when a known patch decides it, else by version


def _link_or_copy(source: Path, target: Path) -> None:
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def prepare_case(request: CaseRequest, images: Images) -> PreparedCase:
    m = request.machine
    m.check_ram(request.ram)
    memmap = get_memmap(request.memmap)
    memmap.check(m, request.ram)
    if request.observing and request.gdb:
        raise UserError("--until kernel-entry and --gdb both need QEMU's gdbstub, and it takes one client")
    if request.until not in UNTIL:
        raise UserError(f"--until {request.until}: choose one of {', '.join(UNTIL)}")
    kernel = existing_file(request.kernel or images.zimage, "kernel")
    zimage = read_zimage(kernel)
    loader = check_kexec(request.kexec) if request.kexec else Loader(images.kexec, True, None)
    if request.initrd is not None:
        initrd_bytes = existing_file(request.initrd, "initrd").stat().st_size
    else:
        initrd_bytes = request.initrd_size
    if initrd_bytes >= request.ram:
        raise UserError(f"initrd of {initrd_bytes} bytes does not fit in {request.ram >> 20} MiB of RAM")
    dtb = check_dtb(request.dtb) if request.dtb else None

    out = request.out
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise UserError(f"output dir {out}: cannot write ({err.strerror})") from None
    # The share may be copied rather than hard-linked (another filesystem): refuse a dir that cannot hold
    # it, so a full disk is one clear line here and not ENOSPC halfway through the run.
    kernel_bytes = kernel.stat().st_size
    need = kernel_bytes + initrd_bytes + OUT_DIR_SLACK
    if request.observing:  # both stops are dumped in full before the dumps that repeat a file are dropped
        need += 2 * (kernel_bytes + initrd_bytes)
    free = shutil.disk_usage(out).free
    if free < need:
        raise UserError(f"output dir {out}: only {free >> 10} KiB free, a case needs about {need >> 20} MiB")
    share = out / "share"
    shutil.rmtree(share, ignore_errors=True)
    (share / "loader").mkdir(parents=True)
    _link_or_copy(kernel, share / "zImage")
    inputs = {"kernel": describe("kernel", kernel, _version_of(images, kernel, images.kernel_package))}
    payload_sha = None
    if request.initrd is not None:
        _link_or_copy(request.initrd, share / "initrd.img")
        inputs["initrd"] = describe("initrd", request.initrd)
    else:
        built = cached_stage2_initrd(images, request.initrd_size, request.seed)
        _link_or_copy(built.path, share / "initrd.img")
        payload_sha = built.payload_sha256
        inputs["initrd"] = replace(
            describe("initrd", share / "initrd.img"),
            version=f"stage2 payload {built.payload_size} bytes, seed {built.seed}",
        )
    if dtb is not None:
        _link_or_copy(dtb, share / "board.dtb")
        inputs["dtb"] = describe("dtb", dtb)
    bundle = loader_bundle(images)
    for lib in (bundle / "lib").iterdir():
        (share / "loader" / "lib").mkdir(exist_ok=True)
        _link_or_copy(lib, share / "loader" / "lib" / lib.name)
    _link_or_copy(loader.binary, share / "loader" / "kexec")
    kexec_version = images.package("kexec-tools").version if request.kexec is None else _built_version(loader.binary)
    inputs["kexec"] = describe("kexec", loader.binary, kexec_version)

    stage1_initrd = stage1_initramfs(images)
    board_dtb = m.board_dtb(images.dtb_dir)
    if board_dtb is not None and not board_dtb.exists():
        raise BenchError(f"{m.name}: DTB {board_dtb.name} is not in the kernel package")
    if memmap.no_map:
        board = board_dtb.read_bytes() if board_dtb else dump_qemu_dtb(qemu_binary(), m, request.ram)
        board_dtb = stage1_dtb(images.root, board, memmap, m.ram_base)
        inputs["stage1_dtb"] = replace(describe("stage1_dtb", board_dtb), version=f"memory map {memmap.name}")
    stage1 = QemuSpec(
        machine=m,
        ram=request.ram,
        kernel=images.zimage,
        initrd=stage1_initrd,
        append=" ".join([f"console={m.console}", *m.stage1_cmdline]),
        dtb=board_dtb,
        share=share,
    )
    inputs["stage1_kernel"] = describe("stage1_kernel", images.zimage, images.package(images.kernel_package).version)
    run_kexec = f"{GUEST_SHARE}/loader/kexec"
    if loader.dynamic:
        libdir = f"{GUEST_SHARE}/loader/lib"
        run_kexec = f"{libdir}/ld-linux-armhf.so.3 --library-path {libdir} {run_kexec}"
    load_args = [
        "--debug",
        "-l",
        f"{GUEST_SHARE}/zImage",
        f"--initrd={GUEST_SHARE}/initrd.img",
        f"--dtb={GUEST_SHARE}/board.dtb",
        f"--command-line={request.stage2_cmdline}",
        *request.kexec_args,
    ]
    return PreparedCase(
        request=request,
        share=share,
        stage1=stage1,
        zimage=zimage,
        loader=loader,
        inputs=inputs,
        image_set=images.provenance(),
        payload_sha256=payload_sha,
        kexec_command=f"{run_kexec} {shlex.join(load_args)}",
        kexec_family=patched_family(loader.binary),
    )


def patched_family(binary: Path) -> str | None:
    """The rule family of a loader scripts/build-kexec built with a patch from data/kexec-patches."""
    try:
        meta = json.loads((binary.parent / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    known = tomllib.loads(data_path("kexec-patches", "families.toml").read_text())
    for patch in meta.get("patches") or []:
        entry = known.get(patch.get("name"))
        packaged = data_path("kexec-patches", str(patch.get("name")))
        if entry and packaged.is_file() and sha256_file(packaged) == patch.get("sha256"):
            return str(entry["family"])
    return None


def _built_version(binary: Path) -> str | None:
    """What scripts/build-kernel or scripts/build-kexec recorded next to its output (meta.json)."""
    try:
        meta = json.loads((binary.parent / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    source = meta.get("source") or {}
    origin = source.get("version") or source.get("describe") or source.get("path") or source.get("kind")
    return f"built {meta.get('name', binary.parent.name)}: {origin}, sha256 {str(meta.get('sha256', ''))[:12]}"


def _version_of(images: Images, path: Path, package: str) -> str | None:
    return images.package(package).version if path == images.zimage else _built_version(path)


def guest_commands(case: PreparedCase) -> list[str]:
    """What the bench types in the stage-1 shell, in order (also written to the share as autorun.sh)."""
    # cache=mmap: kexec-tools mmaps the initrd, and without a page cache every 4 KiB fault is its own 9p
    # read (a 100 MB initrd took 13 s to load instead of 2.5 s). Plain reads and writes stay uncached, so
    # what the guest writes to the share is on the host when the command returns.
    mount = f"mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,cache=mmap {SHARE_TAG} {GUEST_SHARE}"
    save_dtb = [] if case.request.dtb else [f"cp /sys/firmware/fdt {GUEST_SHARE}/board.dtb"]
    run_kexec = case.kexec_command.split(" --debug")[0]
    # One round trip for the set-up: each command costs a console exchange with a TCG guest.
    # repro.sh's stage-1 init has mounted the share already before it runs these as autorun.sh.
    mount = f"{{ mountpoint -q {GUEST_SHARE} || {mount}; }}"
    setup = " && ".join([mount, f"cat /proc/iomem > {GUEST_SHARE}/iomem.txt", *save_dtb])
    return [
        setup,
        f"{run_kexec} --version",
        f"{case.kexec_command} > {GUEST_SHARE}/kexec-debug.txt 2>&1",
        f"{run_kexec} -e",
    ]
