"""Before a case runs: every input checked and the case dir's share laid out (`prepare_case`), and the
commands the bench will type in the stage-1 shell (`guest_commands`). Nothing here starts QEMU."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from .emulator.qemu import QemuSpec, installed_qemu_version, qemu_binary
from .emulator.share import GUEST_SHARE, mount_command, send_back, share_kind
from .errors import BenchError, UserError
from .fileio import write_atomic
from .inputs.checks import Input, Loader, check_dtb, check_kexec, describe, existing_file, loader_bundle
from .inputs.dtb import DtbError, Editor, get_cells, subnodes
from .inputs.images import Images, load_images, patched_family
from .inputs.initramfs import cached_stage2_initrd, payload_bytes, share_initramfs, stage1_initramfs
from .inputs.memmap import PLAIN, dump_qemu_dtb, get_memmap, stage1_dtb
from .inputs.zimage import ZImage, read_zimage
from .machines import Machine
from .modes import CRASH_KERNEL_ARGS, CRASHKERNEL_DEFAULT, MODES
from .oracle.placement import OPTION_CLASH, in_releases
from .payload_check import FULL, PayloadCheck, expected_digest
from .payload_check import choose as choose_payload_check
from .verdict import UNTIL

# What the stage-1 kernel and its modules take of RAM beside an initramfs share (measured: ~40 MiB in use at
# the prompt on sabrelite with an empty share), with room for kexec itself.
STAGE1_KERNEL_RAM = 64 << 20
CPUS_FILE = "cpus.txt"  # stage 1's possible and online CPUs, written during the set-up
# Beyond the kernel and the initrd, a case dir holds the loader bundle (~6 MiB), logs and dumps.
OUT_DIR_SLACK = 32 << 20
# What the second kernel skips because it is no part of the test: the crypto self-tests of every built-in
# algorithm (1.3-1.8 s of the ~3 s from kernel entry to init under TCG, measured with initcall_debug).
STAGE2_BOOT_ARGS = ("cryptomgr.notests",)


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
    kexec: Path | None = None  # None: Debian's kexec-tools of `kexec_suite`
    kexec_suite: str | None = None  # the Debian suite of that kexec-tools (None: stage 1's suite)
    kernel_suite: str | None = None  # the Debian suite `kernel` comes from, when it is a Debian zImage
    kexec_args: tuple[str, ...] = ()
    gdb: bool = False  # a user's debugger will attach: no deadlines
    observe: bool = True  # stop at zImage and kernel entry via the gdbstub, dump and diff every segment
    snapshot: bool = True  # restore stage 1 from its saved state (snapshot.py) instead of booting it
    until: str = "init"  # "kernel-entry": a layout verdict from the ground truth alone, no stage-2 boot
    memmap: str = PLAIN  # a RAM map from images/memmaps.toml: holes stage 1's DTB gives kexec to work around
    full_hash: bool = False  # stage 2 hashes the whole payload even when a sample would do (payload_check.py)
    mode: str = "kexec"  # "kdump": kexec -p into stage 1's crashkernel= reservation, started by a panic
    crashkernel: str = CRASHKERNEL_DEFAULT  # stage 1's crashkernel=SIZE[@ADDR] in mode kdump

    @property
    def observing(self) -> bool:
        return self.observe or self.until == "kernel-entry"

    @property
    def payload_check(self) -> PayloadCheck:
        if self.initrd is not None:
            return FULL  # the user's initrd: the init is theirs, no payload check is asked of it
        return choose_payload_check(self.observing, self.full_hash, self.initrd_size, self.seed)

    @property
    def stage2_cmdline(self) -> str:
        check = self.payload_check.cmdline_word
        return " ".join(
            [
                f"console={self.machine.console}",
                *self.machine.stage2_cmdline,
                *STAGE2_BOOT_ARGS,
                *([check] if check else []),
                *(CRASH_KERNEL_ARGS if self.mode == "kdump" else ()),
                "panic=-1",
            ]
        )


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
    bootargs_in_dtb: bool = False  # the loader cannot take --command-line: /chosen/bootargs carries it


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
    # Debian's loader may come from another suite than stage 1: its binary and library closure both do.
    loader_images = images if request.kexec_suite in (None, images.suite) else load_images(request.kexec_suite)
    loader = check_kexec(request.kexec) if request.kexec else Loader(loader_images.kexec, True, None)
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
    kernel_images = images if request.kernel_suite in (None, images.suite) else load_images(request.kernel_suite)
    inputs = {"kernel": describe("kernel", kernel, _version_of(kernel_images, kernel, kernel_images.kernel_package))}
    payload_sha = None
    if request.initrd is not None:
        _link_or_copy(request.initrd, share / "initrd.img")
        inputs["initrd"] = describe("initrd", request.initrd)
    else:
        built = cached_stage2_initrd(images, request.initrd_size, request.seed)
        _link_or_copy(built.path, share / "initrd.img")
        payload_sha = expected_digest(
            request.payload_check,
            lambda: payload_bytes(request.initrd_size, request.seed),
            built.payload_sha256,
            request.initrd_size,
            built.path.parent,
        )
        inputs["initrd"] = replace(
            describe("initrd", share / "initrd.img"),
            version=f"stage2 payload {built.payload_size} bytes, seed {built.seed}",
        )
    if dtb is not None:
        _link_or_copy(dtb, share / "board.dtb")
        inputs["dtb"] = describe("dtb", dtb)
    bundle = loader_bundle(loader_images)
    for lib in (bundle / "lib").iterdir():
        (share / "loader" / "lib").mkdir(exist_ok=True)
        _link_or_copy(lib, share / "loader" / "lib" / lib.name)
    _link_or_copy(loader.binary, share / "loader" / "kexec")
    kexec_version = (
        loader_images.package("kexec-tools").version if request.kexec is None else _built_version(loader.binary)
    )
    bootargs_in_dtb = request.kexec is None and in_releases(kexec_version, OPTION_CLASH)
    inputs["kexec"] = describe("kexec", loader.binary, kexec_version)

    stage1_initrd = stage1_initramfs(images)
    transport = m.transport(installed_qemu_version())
    if share_kind(transport).in_initramfs:
        if bootargs_in_dtb:
            raise UserError(
                f"{m.name}: kexec-tools {kexec_version} takes no --command-line here and the share travels in "
                "the initramfs, so the bench cannot put the command line into the DTB the guest loads"
            )
        stage1_initrd = _initramfs_share(images, stage1_initrd, share, request.ram)
    board_dtb = m.board_dtb(images.dtb_dir)
    if board_dtb is not None and not board_dtb.exists():
        raise BenchError(f"{m.name}: DTB {board_dtb.name} is not in the kernel package")
    cpu_words = _nr_cpus(m, board_dtb)
    share_words: list[str] = []
    if transport == "virtio-9p-pci":  # the board's PCIe as QEMU models it (machines.toml pci_*)
        share_words = list(m.pci_stage1_cmdline)
        if m.pci_intx is not None and board_dtb is not None:
            board_dtb = _pci_intx_dtb(images.root, board_dtb, *m.pci_intx)
            inputs["stage1_dtb"] = replace(describe("stage1_dtb", board_dtb), version="PCIe INTx as QEMU wires it")
    if memmap.no_map:
        board = board_dtb.read_bytes() if board_dtb else dump_qemu_dtb(qemu_binary(), m, request.ram)
        board_dtb = stage1_dtb(images.root, board, memmap, m.ram_base)
        inputs["stage1_dtb"] = replace(describe("stage1_dtb", board_dtb), version=f"memory map {memmap.name}")
    stage1 = QemuSpec(
        machine=m,
        ram=request.ram,
        kernel=images.zimage,
        initrd=stage1_initrd,
        append=" ".join([f"console={m.console}", *m.stage1_cmdline, *cpu_words, *share_words, *_crash_words(request)]),
        dtb=board_dtb,
        share=share,
        transport=transport,
    )
    inputs["stage1_kernel"] = describe("stage1_kernel", images.zimage, images.package(images.kernel_package).version)
    run_kexec = f"{GUEST_SHARE}/loader/kexec"
    if loader.dynamic:
        libdir = f"{GUEST_SHARE}/loader/lib"
        run_kexec = f"{libdir}/ld-linux-armhf.so.3 --library-path {libdir} {run_kexec}"
    load_args = [
        "--debug",
        "-p" if request.mode == "kdump" else "-l",
        f"{GUEST_SHARE}/zImage",
        f"--initrd={GUEST_SHARE}/initrd.img",
        f"--dtb={GUEST_SHARE}/board.dtb",
        # kexec-tools 2.0.17-2.0.20 cannot take --command-line on ARM (DOMAIN 9.2): the bench writes the
        # stage-2 command line into the DTB's /chosen instead (put_bootargs_in_dtb), as users of those
        # releases must
        *([] if bootargs_in_dtb else [f"--command-line={request.stage2_cmdline}"]),
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
        bootargs_in_dtb=bootargs_in_dtb,
    )


def _crash_words(request: CaseRequest) -> list[str]:
    """Stage 1's crashkernel= word in mode kdump (it is part of the stage-1 snapshot's key, the append)."""
    if request.mode not in MODES:
        raise UserError(f"--mode {request.mode}: choose one of {', '.join(MODES)}")
    if request.mode != "kdump":
        return []
    if request.until != "init":
        raise UserError("--until kernel-entry is for kexec -l cases; a kdump case is judged by the crash kernel")
    if not re.fullmatch(r"\d+[KMG]?(@(0x[0-9a-fA-F]+|\d+[KMG]?))?", request.crashkernel):
        raise UserError(f"--crashkernel {request.crashkernel}: expected SIZE[@ADDR], e.g. 64M or 64M@0x50000000")
    return [f"crashkernel={request.crashkernel}"]


def put_bootargs_in_dtb(case: PreparedCase) -> None:
    """The stage-2 command line into the share's board.dtb /chosen/bootargs (after stage 1 copied it there),
    for a loader that cannot take --command-line."""
    path = case.share / "board.dtb"
    try:
        tree = Editor(path.read_bytes())
        tree.set_string("/chosen", "bootargs", case.request.stage2_cmdline)
        path.write_bytes(bytes(tree))
    except (OSError, DtbError) as err:
        raise BenchError(f"cannot write the command line into {path}: {err}") from None


def _nr_cpus(m: Machine, board_dtb: Path | None) -> list[str]:
    """`nr_cpus=N` when QEMU runs fewer CPUs than the board's DTB lists on a board that cannot take a CPU
    offline: the kernel counts the absent ones as possible and refuses every kexec_load (EINVAL). With as
    many CPUs as the DTB lists, the refusal is the board's own and the case shows it (verdict `load`)."""
    if m.cpu_hotplug or board_dtb is None:  # QEMU's own DTB lists exactly -smp CPUs
        return []
    listed = [n for n in subnodes(board_dtb.read_bytes(), "/cpus") if n.startswith("cpu@")]
    return [f"nr_cpus={m.smp}"] if m.smp < len(listed) else []


def _pci_intx_dtb(cache_root: Path, board_dtb: Path, node: str, spis: tuple[int, ...]) -> Path:
    """The board DTB with the PCIe host's INTA..INTD routed to the GIC SPIs QEMU wires them to (cached by
    content). interrupt-map entries: 3 address cells and the pin, the parent's phandle, then its 3 cells
    (0, SPI, flags)."""
    data = board_dtb.read_bytes()
    words = get_cells(data, node, "interrupt-map") or []
    if not words or len(words) % 8:
        raise BenchError(f"{board_dtb.name}: {node} has no interrupt-map of 8-cell entries to rewire")
    for entry in range(0, len(words), 8):
        words[entry + 6] = spis[words[entry + 3] - 1]  # the pin is 1-based: INTA = 1
    tree = Editor(data)
    tree.set_cells(node, "interrupt-map", *((w, 1) for w in words))
    fixed = bytes(tree)
    target = cache_root / "dtb" / f"pci-intx-{hashlib.sha256(fixed).hexdigest()[:20]}.dtb"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(target, fixed)
    return target


def _initramfs_share(images: Images, stage1: Path, share: Path, ram: int) -> Path:
    """The share's files appended to the stage-1 initramfs (the `initramfs` transport, emulator/share.py).
    They live in stage 1's RAM: the archive, its unpacked copy until the archive is freed, then kexec's
    own copy of the initrd (its buffer and the kernel's segment) beside the unpacked files."""
    files = {str(p.relative_to(share)): p for p in sorted(share.rglob("*")) if p.is_file()}
    image = share_initramfs(images, stage1, files)
    size = image.stat().st_size
    initrd = files["initrd.img"].stat().st_size
    need = max(2 * size, size + 2 * initrd) + STAGE1_KERNEL_RAM
    if need > ram:
        raise UserError(
            f"{ram >> 20} MiB of RAM cannot hold this case's share in the stage-1 initramfs (the board has no "
            f"virtio): {size >> 20} MiB unpacked, beside its archive and then beside kexec's two copies of the "
            f"initrd, need about {need >> 20} MiB; give --ram {1 << (need - 1).bit_length() >> 20}M"
        )
    return image


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
    kind = case.stage1.share_transport
    mount = mount_command(kind)
    save_dtb = [] if case.request.dtb else [f"cp /sys/firmware/fdt {GUEST_SHARE}/board.dtb"]
    run_kexec = case.kexec_command.split(" --debug")[0]
    cpus = "/sys/devices/system/cpu"
    # One round trip for the set-up: each command costs a console exchange with a TCG guest.
    # repro.sh's stage-1 init has mounted the share already before it runs these as autorun.sh.
    setup = " && ".join(
        [
            # not `mountpoint`: Debian's busybox-static lacks it, and repro.sh's init has mounted it already
            *([f"{{ grep -q ' {GUEST_SHARE} ' /proc/mounts || {mount}; }}"] if mount else []),
            f"cat /proc/iomem > {GUEST_SHARE}/iomem.txt",
            # the CPUs stage 1 has, for a kexec_load refused because one cannot go offline (cpus.py)
            f"echo possible $(cat {cpus}/possible) online $(cat {cpus}/online) > {GUEST_SHARE}/{CPUS_FILE}",
            *save_dtb,
            *send_back(kind, "iomem.txt", CPUS_FILE, *(["board.dtb"] if save_dtb else [])),
        ]
    )
    load = f"{case.kexec_command} > {GUEST_SHARE}/kexec-debug.txt 2>&1"
    back = send_back(kind, "kexec-debug.txt")
    if back:  # the share is read only for the host: kexec's output comes back over the console, $? kept
        load = f"{load}; tb_rc=$?; {back[0]}; (exit $tb_rc)"
    # kdump: the crash kernel starts from a panic (sysrq takes writes to the trigger whatever its mask says)
    start = "echo c > /proc/sysrq-trigger" if case.request.mode == "kdump" else f"{run_kexec} -e"
    return [setup, f"{run_kexec} --version", load, start]
