"""`testbench doctor`: is this machine ready to run the bench? Each problem comes with the command that fixes it.

Checks QEMU (present, >= 7.0, the boards of machines.toml), the Debian archive keyring, the image cache
(the default suite's manifest fetched from the lock in force, every unpacked tree, every .deb against its
sha256), the files each machine's case opens and the board started with exactly the bench's devices, free
disk for the cache and the output dir, the Python dependencies, and the host tools (depmod, dpkg-deb,
apt-get). Exit 0 when nothing fails (warnings, such as low disk, are printed but do not fail), 1 when a check
fails.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .fileio import sha256_file

LOW_DISK = 2 << 30
# A board that cannot start (missing ROM, bad device) exits within a fraction of a second.
QEMU_START_PROBE = 1.5
SETUP = "scripts/setup"
# module to import -> the distribution that provides it (pyproject's dependencies and the dev extra).
PYTHON_DEPS = {
    "qemu.qmp": "qemu.qmp",
    "elftools": "pyelftools",
    "libfdt": "pylibfdt",
    "pytest": "pytest",
    "xdist": "pytest-xdist",
}
DEV_DEPS = {"hypothesis": "hypothesis"}
# host tool -> Debian package: depmod runs once per fetched kernel, dpkg-deb unpacks and apt-get fetches the
# images. (DTBs are read and edited in process, testbench/dtb.py; the tests use dtc/fdtget as a second opinion.)
HOST_TOOLS = {"depmod": "kmod", "dpkg-deb": "dpkg", "apt-get": "apt"}


@dataclass(frozen=True)
class Finding:
    level: str  # "ok", "warn" or "fail"
    what: str
    fix: str | None = None

    def line(self) -> str:
        text = f"{self.level.upper():<5} {self.what}"
        return f"{text}; fix: {self.fix}" if self.fix else text


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str] | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None


def check_qemu() -> Iterator[Finding]:
    from .emulator.qemu import MIN_QEMU_VERSION, QEMU_BINARY, qemu_version
    from .machines import all_machines

    install = f"apt-get install {QEMU_BINARY}"
    binary = shutil.which(QEMU_BINARY)
    if binary is None:
        yield Finding("fail", f"{QEMU_BINARY} is not on PATH", install)
        return
    try:
        version = qemu_version(binary)
    except UserError as err:
        need = ".".join(map(str, MIN_QEMU_VERSION))
        yield Finding("fail", f"{QEMU_BINARY}: {err}", f"{install} (Debian 12 ships 7.2; need {need}+)")
        return
    yield Finding("ok", f"{QEMU_BINARY} {'.'.join(map(str, version))} at {binary}")
    done = _run([binary, "-machine", "help"])
    listed = {line.split()[0] for line in (done.stdout if done else "").splitlines()[1:] if line.strip()}
    wanted = {m.qemu_machine for m in all_machines().values()}
    missing = sorted(wanted - listed)
    if missing:
        yield Finding(
            "fail",
            f"{QEMU_BINARY} lacks the machines {', '.join(missing)}",
            f"apt-get install --reinstall {QEMU_BINARY} (Debian's build has every ARM board)",
        )
    else:
        yield Finding("ok", f"QEMU machines present: {', '.join(sorted(wanted))}")


def check_keyring() -> Iterator[Finding]:
    from .inputs.apt import KEYRING

    if KEYRING.is_file():
        yield Finding("ok", f"Debian archive keyring {KEYRING} (the private apt's only trust)")
    else:
        yield Finding(
            "fail",
            f"{KEYRING} is missing: the guest images cannot be verified",
            "apt-get install debian-archive-keyring",
        )


def check_cache() -> Iterator[Finding]:
    from .inputs.images import cache_dir, manifest_path
    from .inputs.lock import read_lock

    root = cache_dir()
    try:
        locked = read_lock().suite(None)
    except UserError as err:
        yield Finding("fail", str(err), "git checkout images/lock.toml")
        return
    fetch = f"testbench images fetch --suite {locked.suite}"
    path = manifest_path(locked.suite)
    if not path.is_file():
        yield Finding("fail", f"image cache {root}: no {locked.suite} images (nothing fetched yet)", fetch)
        return
    try:
        manifest = json.loads(path.read_text())
        packages = [(p["name"], p["sha256"], p["deb"], p["tree"]) for p in manifest["packages"]]
        kernel = manifest["kernel_package"]
        fetched_from = manifest.get("lock_sha256")
    except (OSError, ValueError, KeyError, TypeError) as err:
        yield Finding("fail", f"image cache {root}: {path.name} is unreadable ({err})", fetch)
        return
    if fetched_from != locked.sha256:
        yield Finding("fail", f"image cache {root}: the {locked.suite} set was fetched from another lock", fetch)
        return
    for drift in manifest.get("drift", ()):
        yield Finding(
            "warn",
            f"image cache: {drift['name']} drifted from the lock ({drift['locked']} locked, {drift['now']} fetched)",
            f"testbench images lock --suite {locked.suite}",
        )
    problems = 0
    for name, sha, deb, tree in packages:
        if not (root / "tree" / tree).is_dir():
            problems += 1
            yield Finding("fail", f"image cache: {name} is not unpacked (tree/{tree[:12]}… missing)", fetch)
        deb_path = root / "debs" / deb
        if not deb_path.is_file():
            problems += 1
            yield Finding("fail", f"image cache: {deb} is missing", fetch)
        elif sha256_file(deb_path) != sha:
            problems += 1
            yield Finding(
                "fail", f"image cache: {deb} does not match its sha256 in the manifest", f"rm {deb_path} && {fetch}"
            )
    leftovers = sorted((root / "tree").glob(".unpack-*")) if (root / "tree").is_dir() else []
    if leftovers:
        # Never used (trees appear only by an atomic rename), but they waste space.
        yield Finding(
            "warn",
            f"image cache: {len(leftovers)} leftover partial unpack dir(s) from an interrupted fetch",
            f"rm -rf {root}/tree/.unpack-*",
        )
    if not problems:
        names = {p[0] for p in packages}
        wanted = {kernel, "busybox-static", "kexec-tools"}
        if not wanted <= names:
            yield Finding("fail", f"image cache: manifest lacks {', '.join(sorted(wanted - names))}", fetch)
        else:
            yield Finding(
                "ok",
                f"image cache {root}: {locked.suite}, {len(packages)} armhf packages as locked, "
                "every .deb matches its sha256",
            )


def check_case_files() -> Iterator[Finding]:
    """The files a case opens, per machine: the stage-1 kernel, busybox, kexec, the kernel's modules.dep, the
    board's DTB; and the board itself started with exactly the devices a case gives it (a missing ROM or firmware
    stops QEMU at once: that is how virt's default NIC failed on a fresh machine)."""
    from .emulator.qemu import QemuSpec, qemu_args, qemu_binary
    from .inputs.images import load_images
    from .machines import all_machines

    try:
        images = load_images()
        binary = qemu_binary()
    except UserError:
        return  # check_cache / check_qemu already said why
    common = [images.zimage, images.busybox, images.kexec, images.modules_dir / "modules.dep"]
    for machine in all_machines().values():
        board_dtb = machine.board_dtb(images.dtb_dir)
        files = [*common, *([board_dtb] if board_dtb else [])]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            yield Finding(
                "fail",
                f"{machine.name}: a case would open missing files: {', '.join(missing)}",
                f"testbench images fetch --suite {images.suite}",
            )
            continue
        with tempfile.TemporaryDirectory(prefix="tb-doctor-") as share:
            spec = QemuSpec(
                machine=machine,
                ram=machine.default_ram,
                kernel=None,
                initrd=None,
                append="",
                dtb=None,
                share=Path(share),
            )
            args = [binary, *qemu_args(spec, None)[1:], "-S"]
            problem = _starts(args, dict(machine.env))
        if problem:
            yield Finding(
                "fail",
                f"{machine.name}: QEMU does not start with the bench's devices: {problem}",
                f"apt-get install --reinstall {binary.rsplit('/', 1)[-1]}",
            )
        else:
            yield Finding(
                "ok",
                f"{machine.name}: {len(files)} input files present; the board starts with "
                "-nodefaults and the bench's devices",
            )


def _starts(args: list[str], env: dict[str, str]) -> str | None:
    """None when QEMU is still up after a moment (paused with -S, nothing runs), else its last stderr line."""
    proc = subprocess.Popen(
        args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, **env},
        start_new_session=True,
    )
    try:
        _, err = proc.communicate(timeout=QEMU_START_PROBE)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return None
    lines = err.decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else f"exit code {proc.returncode}"


def _free(path: Path) -> int:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent  # the dir may not exist yet: its filesystem is the nearest existing parent's
    return shutil.disk_usage(probe).free


def check_disk(out: Path) -> Iterator[Finding]:
    from .inputs.images import cache_dir

    for label, path, elsewhere in (("image cache", cache_dir(), "TESTBENCH_CACHE"), ("output dir", out, "--out")):
        free = _free(path)
        if free < LOW_DISK:
            yield Finding(
                "warn",
                f"{label} {path}: only {free / (1 << 30):.1f} GiB free (want 2 GiB)",
                f"free space there, or point {elsewhere} at a bigger filesystem",
            )
        else:
            yield Finding("ok", f"{label} {path}: {free / (1 << 30):.0f} GiB free")


def check_python() -> Iterator[Finding]:
    for deps, level in ((PYTHON_DEPS, "fail"), (DEV_DEPS, "warn")):
        missing = []
        for module, dist in deps.items():
            try:
                importlib.import_module(module)
            except ImportError:
                missing.append(dist)
        if missing:
            extra = "[dev]" if deps is DEV_DEPS else ""
            yield Finding(
                level,
                f"Python packages missing: {', '.join(missing)}",
                f".venv/bin/pip install -e '.{extra}' (or {SETUP})",
            )
        else:
            yield Finding("ok", f"Python packages importable: {', '.join(deps.values())}")


def check_tools() -> Iterator[Finding]:
    missing = {tool: pkg for tool, pkg in HOST_TOOLS.items() if shutil.which(tool) is None}
    if missing:
        packages = " ".join(sorted(set(missing.values())))
        yield Finding("fail", f"host tools missing: {', '.join(missing)}", f"apt-get install {packages}")
    else:
        yield Finding("ok", f"host tools present: {', '.join(HOST_TOOLS)}")


def diagnose(out: Path) -> list[Finding]:
    checks: list[Callable[[], Iterator[Finding]]] = [
        check_qemu,
        check_keyring,
        check_cache,
        check_case_files,
        lambda: check_disk(out),
        check_python,
        check_tools,
    ]
    return [finding for check in checks for finding in check()]


def cmd_doctor(args: argparse.Namespace) -> int:
    findings = diagnose(Path(args.out))
    for finding in findings:
        print(finding.line(), flush=True)
    failed = [f for f in findings if f.level == "fail"]
    warned = [f for f in findings if f.level == "warn"]
    if failed:
        print(f"{len(failed)} problem(s), {len(warned)} warning(s); `{SETUP}` fixes most of them in one go")
        return 1
    print(f"ready ({len(warned)} warning(s))")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    doctor = subparsers.add_parser("doctor", help="check QEMU, the image cache, disk, tools and Python deps")
    doctor.add_argument("--out", default="out", help="output dir whose free space to check (default out)")
    doctor.set_defaults(func=cmd_doctor)
