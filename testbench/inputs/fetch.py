"""Filling the image cache: exactly a suite's locked package set, through its private apt configuration.

`fetch_images()` asks the archive only for what the cache lacks, refuses (one line, before any download) a
locked version the archive no longer has, and writes the suite's manifest last, atomically; with
TESTBENCH_ALLOW_DRIFT=1 it takes the archive's current set instead and the manifest, and so every result,
records the drift. `lock_images()` rewrites a suite's table in the lock file from the archive.
"""

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import BenchError, UserError
from ..fileio import sha256_file
from .apt import ARCH, PrivateApt, dependency_names
from .images import (
    DEFAULT_SUITE,
    DRIFT_ENV,
    KERNEL_METAPACKAGE,
    LIBRARY_SECTIONS,
    ROOT_PACKAGES,
    Drift,
    Images,
    _cache_lock,
    _say_stderr,
    _write_json_atomic,
    cache_dir,
    load_images,
    manifest_path,
    offline,
)
from .lock import LockedPackage, SuiteLock, lock_path, read_lock, write_suite


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise BenchError(f"{cmd[0]} not found; run scripts/setup") from None
    if done.returncode != 0:
        raise BenchError(f"{' '.join(cmd)} failed: {done.stderr.strip().splitlines()[-1:] or done.returncode}")
    return done.stdout


def _kernel_package(apt: PrivateApt) -> str | None:
    """The linux-image-*-armmp package the suite's linux-image-armmp depends on now."""
    names = dependency_names(apt.show(KERNEL_METAPACKAGE))
    return next((n for n in names if n.startswith("linux-image-") and n.endswith("-armmp")), None)


def resolve_package_set(apt: PrivateApt) -> tuple[str, dict[str, dict[str, str]]]:
    """The kernel package name and the archive's fields of every package to fetch (roots + library closure),
    as the suite's archive has them now."""
    kernel = _kernel_package(apt)
    if kernel is None:
        raise BenchError(f"{apt.suite}: {KERNEL_METAPACKAGE}:{ARCH} depends on no linux-image-*-armmp package")
    wanted: dict[str, dict[str, str]] = {}
    queue = [kernel, *ROOT_PACKAGES]
    roots = set(queue)
    while queue:
        name = queue.pop()
        if name in wanted:
            continue
        fields = apt.show(name)
        if name in roots and "Package" not in fields:
            raise BenchError(f"{apt.suite}: the archive has no {name}:{ARCH}")
        if name not in roots and (fields.get("Section") not in LIBRARY_SECTIONS or fields.get("Architecture") != ARCH):
            continue
        wanted[name] = fields
        if name != kernel:  # the kernel's dependencies (initramfs tools, firmware) are host-side tooling
            queue.extend(dependency_names(fields))
    return kernel, wanted


def _locked_from_archive(suite: str, kernel: str, wanted: dict[str, dict[str, str]]) -> SuiteLock:
    packages = tuple(
        LockedPackage(name=f["Package"], version=f["Version"], sha256=f["SHA256"], size=int(f.get("Size", 0)))
        for f in wanted.values()
    )
    return SuiteLock(suite=suite, kernel=kernel, locked_on=time.strftime("%Y-%m-%d"), packages=packages)


def lock_images(suite: str | None = None, say: Callable[[str], None] = _say_stderr) -> SuiteLock:
    """Resolve SUITE's package set from the archive as it is now and write it into the lock file."""
    if offline():
        raise UserError("TESTBENCH_OFFLINE is set: locking needs the archive")
    path = lock_path()
    old = read_lock(path) if path.exists() else None
    suite = suite or (old.default_suite if old else DEFAULT_SUITE)
    root = cache_dir()
    with _cache_lock(root):
        apt = PrivateApt(root, suite)
        say(f"resolving {suite}'s armhf packages from the archive")
        for note in apt.update():
            say(note)
        fresh = _locked_from_archive(suite, *resolve_package_set(apt))
    before = next((s for s in old.suites if s.suite == suite), None) if old else None
    for change in _changes(before, fresh):
        say(change)
    write_suite(fresh, path)
    say(f"{path}: {suite} locked, {len(fresh.packages)} packages, kernel {fresh.kernel}")
    return fresh


def _changes(before: SuiteLock | None, after: SuiteLock) -> list[str]:
    old = {p.name: p.version for p in before.packages} if before else {}
    new = {p.name: p.version for p in after.packages}
    lines = [f"  {n}: {old[n]} -> {new[n]}" for n in sorted(old.keys() & new.keys()) if old[n] != new[n]]
    lines += [f"  + {n} {new[n]}" for n in sorted(new.keys() - old.keys())]
    lines += [f"  - {n} {old[n]}" for n in sorted(old.keys() - new.keys())]
    return lines


# --- fetching -------------------------------------------------------------------------------------


def _deb_name(want: LockedPackage) -> str:
    return f"{want.name}_{want.version.replace(':', '%3a')}_{ARCH}.deb"


def _cached(root: Path, want: LockedPackage) -> bool:
    deb = root / "debs" / _deb_name(want)
    return deb.is_file() and (root / "tree" / want.sha256).is_dir() and sha256_file(deb) == want.sha256


def _download(root: Path, apt: PrivateApt, want: LockedPackage, say: Callable[[str], None]) -> None:
    debs = root / "debs"
    debs.mkdir(exist_ok=True)
    deb = debs / _deb_name(want)
    if not (deb.is_file() and sha256_file(deb) == want.sha256):
        say(f"downloading {want.name} {want.version} ({want.size >> 10} KiB)")
        with tempfile.TemporaryDirectory(dir=debs) as tmp:
            got = apt.download(want.name, want.version, Path(tmp))
            if sha256_file(got) != want.sha256:
                raise BenchError(f"{got.name}: sha256 differs from the lock's {want.sha256[:16]}…; refusing it")
            os.replace(got, deb)
    _unpack(root, want, deb, say)


def _unpack(root: Path, want: LockedPackage, deb: Path, say: Callable[[str], None]) -> None:
    trees = root / "tree"
    trees.mkdir(exist_ok=True)
    tree = trees / want.sha256
    if tree.is_dir():
        return
    say(f"unpacking {want.name}")
    tmp_tree = Path(tempfile.mkdtemp(dir=trees, prefix=".unpack-"))
    try:
        _run(["dpkg-deb", "-x", str(deb), str(tmp_tree)])
        os.replace(tmp_tree, tree)
    finally:
        shutil.rmtree(tmp_tree, ignore_errors=True)


def allow_drift() -> bool:
    return os.environ.get(DRIFT_ENV, "") not in ("", "0")


def _gone_line(suite: SuiteLock, gone: list[LockedPackage], apt: PrivateApt) -> str:
    first = gone[0]
    if first.name == suite.kernel:  # a point release renames the kernel package: name what replaced it
        kernel = _kernel_package(apt)
        now = f"{kernel} {apt.show(kernel).get('Version', '?')}" if kernel else "nothing"
    else:
        now = apt.show(first.name).get("Version", "no such package")
    more = f" (and {len(gone) - 1} more)" if len(gone) > 1 else ""
    return (
        f"{suite.suite}: locked {first.name} {first.version} is no longer in the archive, which now has "
        f"{now}{more}: run `testbench images lock --suite {suite.suite}` to lock the new set, or set "
        f"{DRIFT_ENV}=1 to take it and record the drift"
    )


def fetch_images(
    suite: str | None = None, say: Callable[[str], None] = _say_stderr, drift_ok: bool | None = None
) -> Images:
    """Make the cache hold exactly SUITE's locked set (default: the lock's default suite). The archive is
    asked only when something is missing. A locked version the archive no longer has is one UserError,
    before anything is downloaded; with drift allowed the archive's current set is taken and recorded."""
    lock = read_lock()
    locked = lock.suite(suite)
    root = cache_dir()
    if offline():
        say("TESTBENCH_OFFLINE is set: using the cache as it is")
        return load_images(locked.suite)
    drift_ok = allow_drift() if drift_ok is None else drift_ok
    with _cache_lock(root):
        wanted = list(locked.packages)
        kernel = locked.kernel
        drift: tuple[Drift, ...] = ()
        apt = PrivateApt(root, locked.suite)
        missing = [w for w in wanted if not _cached(root, w)]
        if missing:
            say(
                f"{len(missing)} of {len(wanted)} locked {locked.suite} packages to fetch; updating the "
                "private apt lists"
            )
            for note in apt.update():
                say(note)
            gone = [
                p
                for p in locked.packages
                if any(w.name == p.name for w in missing) and apt.show(p.name, p.version).get("SHA256") != p.sha256
            ]
            if gone and not drift_ok:
                raise UserError(_gone_line(locked, gone, apt))
            if gone:
                kernel, fields = resolve_package_set(apt)
                wanted = list(_locked_from_archive(locked.suite, kernel, fields).packages)
                drift = _drift(locked, wanted)
                for item in drift:
                    say(f"DRIFT {item.describe()}")
                missing = [w for w in wanted if not _cached(root, w)]
            for want in missing:
                _download(root, apt, want, say)
        release = kernel.removeprefix("linux-image-")
        _depmod(root / "tree" / next(w.sha256 for w in wanted if w.name == kernel), release)
        manifest = {
            "suite": locked.suite,
            "lock": str(lock.path),
            "lock_sha256": locked.sha256,
            "drift": [d.to_dict() for d in drift],
            "kernel_package": kernel,
            "kernel_release": release,
            "packages": [
                {"name": w.name, "version": w.version, "sha256": w.sha256, "deb": _deb_name(w), "tree": w.sha256}
                for w in sorted(wanted, key=lambda w: w.name)
            ],
        }
        path = manifest_path(locked.suite)
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(path, manifest)
        say(
            f"image cache ready in {root}: {locked.suite}, {len(wanted)} packages, kernel {release}"
            + (f", {len(drift)} drifted from the lock" if drift else "")
        )
        return load_images(locked.suite)


def _drift(locked: SuiteLock, wanted: list[LockedPackage]) -> tuple[Drift, ...]:
    now = {w.name: w.version for w in wanted}
    was = {p.name: p.version for p in locked.packages}
    # The kernel changes its package name with its ABI: pair the old and new kernel as one drift.
    old_kernel = locked.kernel
    new_kernel = next((n for n in now if n.startswith("linux-image-") and n not in was), None)
    items = []
    for name in sorted(was.keys() | now.keys()):
        if name == new_kernel and old_kernel not in now:
            continue
        if name == old_kernel and old_kernel not in now and new_kernel:
            items.append(Drift(f"{old_kernel} -> {new_kernel}", was[name], now[new_kernel]))
        elif was.get(name) != now.get(name):
            items.append(Drift(name, was.get(name), now.get(name)))
    return tuple(items)


def _depmod(kernel_tree: Path, release: str) -> None:
    # Debian 13's kernel ships its modules under usr/lib/modules (merged /usr); give the tree the /lib -> usr/lib
    # link a merged-/usr system has, so depmod -b and the initramfs builder find them in one place.
    if not (kernel_tree / "lib").exists() and (kernel_tree / "usr" / "lib" / "modules").is_dir():
        (kernel_tree / "lib").symlink_to("usr/lib")
    # modules.dep is not shipped in the .deb; generate it on the host, once per unpacked kernel.
    if not (kernel_tree / "lib" / "modules" / release / "modules.dep").exists():
        depmod = shutil.which("depmod") or "/usr/sbin/depmod"
        _run([depmod, "-b", str(kernel_tree), release])
