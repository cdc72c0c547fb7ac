"""Guest inputs: a locked set of Debian armhf packages, fetched through a private apt configuration and
unpacked into a sha256-keyed cache.

The cache lives outside git ($TESTBENCH_CACHE, default ~/.cache/testbench). `images/lock.toml` (lock.py)
names, per Debian suite, every package by version and sha256: the kernel that linux-image-armmp depended on,
busybox-static, kexec-tools and the shared libraries it needs. `fetch_images()` downloads what the cache lacks
through the suite's private apt (apt.py: the host's sources never decide what is fetched), checks each .deb
against the lock's sha256, unpacks it into `tree/<sha256>/` and writes `suites/<suite>/manifest.json` last,
atomically. `load_images()` only reads the manifest, so a run never downloads; with TESTBENCH_OFFLINE=1
fetching is refused too.
"""

import fcntl
import json
import os
import sys
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..datafiles import data_path
from ..errors import BenchError, UserError
from ..fileio import sha256_file, write_atomic
from .lock import read_lock

DEFAULT_SUITE = "bookworm"
DRIFT_ENV = "TESTBENCH_ALLOW_DRIFT"
KERNEL_METAPACKAGE = "linux-image-armmp"
ROOT_PACKAGES = ("busybox-static", "kexec-tools")
# Only dependencies in these sections are followed: they hold the shared objects kexec needs, whereas
# debconf, dpkg or tar (section admin/utils) are packaging machinery a static guest never runs.
LIBRARY_SECTIONS = {"libs"}


def _say_stderr(line: str) -> None:
    print(line, file=sys.stderr)


def cache_dir() -> Path:
    env = os.environ.get("TESTBENCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "testbench"


def offline() -> bool:
    return os.environ.get("TESTBENCH_OFFLINE", "") not in ("", "0")


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    sha256: str
    deb: str  # file name under debs/
    tree: str  # directory under tree/

    def to_dict(self) -> dict:
        return {"name": self.name, "version": self.version, "sha256": self.sha256, "deb": self.deb}


@dataclass(frozen=True)
class Drift:
    """A package the cache holds in another version than the lock names (taken with TESTBENCH_ALLOW_DRIFT)."""

    name: str
    locked: str | None
    now: str | None

    def describe(self) -> str:
        return f"{self.name}: locked {self.locked or '(none)'}, fetched {self.now or '(none)'}"

    def to_dict(self) -> dict:
        return {"name": self.name, "locked": self.locked, "now": self.now}


@dataclass(frozen=True)
class Images:
    """Paths into the unpacked cache, plus the provenance of every package."""

    root: Path
    suite: str
    kernel_package: str
    kernel_release: str
    packages: tuple[Package, ...]
    lock_sha256: str = ""
    drift: tuple[Drift, ...] = ()

    def provenance(self) -> dict:
        """What result.json says about where the guest images came from."""
        return {"suite": self.suite, "lock_sha256": self.lock_sha256, "drift": [d.to_dict() for d in self.drift]}

    def tree(self, name: str) -> Path:
        for package in self.packages:
            if package.name == name:
                return self.root / "tree" / package.tree
        raise BenchError(f"package {name} is not in the image cache; run `testbench images fetch`")

    def package(self, name: str) -> Package:
        return next(p for p in self.packages if p.name == name)

    @property
    def zimage(self) -> Path:
        return self.tree(self.kernel_package) / "boot" / f"vmlinuz-{self.kernel_release}"

    # trixie's packages are merged-/usr (usr/sbin/kexec, usr/lib/modules); bookworm's and bullseye's are not
    @property
    def modules_dir(self) -> Path:
        return _usr_merged(self.tree(self.kernel_package), f"lib/modules/{self.kernel_release}")

    @property
    def dtb_dir(self) -> Path:
        return self.tree(self.kernel_package) / "usr" / "lib" / f"linux-image-{self.kernel_release}"

    @property
    def busybox(self) -> Path:
        return _usr_merged(self.tree("busybox-static"), "bin/busybox")

    @property
    def kexec(self) -> Path:
        return _usr_merged(self.tree("kexec-tools"), "sbin/kexec")

    def library_trees(self) -> list[Path]:
        return [
            self.root / "tree" / p.tree
            for p in self.packages
            if p.name not in (self.kernel_package, "busybox-static", "kexec-tools")
        ]


def _usr_merged(tree: Path, path: str) -> Path:
    """TREE/PATH, or TREE/usr/PATH when the package ships it under /usr (merged-/usr suites)."""
    plain = tree / path
    return plain if plain.exists() or not (tree / "usr" / path).exists() else tree / "usr" / path


@contextmanager
def _cache_lock(root: Path) -> Iterator[None]:
    """One fetcher at a time per cache; readers only look at the manifest, which is written atomically."""
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _write_json_atomic(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=2).encode())


def manifest_path(suite: str) -> Path:
    return cache_dir() / "suites" / suite / "manifest.json"


def load_images(suite: str | None = None) -> Images:
    """The cache's fetched set for SUITE (default: the lock's default suite). Never downloads; refuses a
    cache fetched from another lock than the one in force (inputs never change silently)."""
    locked = read_lock().suite(suite)
    root = cache_dir()
    path = manifest_path(locked.suite)
    if not path.exists():
        hint = "unset TESTBENCH_OFFLINE and run" if offline() else "run"
        raise UserError(
            f"no {locked.suite} images in the cache at {root}: {hint} "
            f"`testbench images fetch --suite {locked.suite}` (or scripts/setup)"
        )
    try:
        manifest = json.loads(path.read_text())
        packages = tuple(
            Package(name=p["name"], version=p["version"], sha256=p["sha256"], deb=p["deb"], tree=p["tree"])
            for p in manifest["packages"]
        )
        drift = tuple(Drift(d["name"], d["locked"], d["now"]) for d in manifest.get("drift", ()))
        fetched_from = manifest.get("lock_sha256")
        kernel, release = manifest["kernel_package"], manifest["kernel_release"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path}: unreadable manifest ({err}); run `testbench images fetch`") from None
    if fetched_from != locked.sha256:
        raise UserError(
            f"the image cache's {locked.suite} set was fetched from another lock than "
            f"{read_lock().path}: run `testbench images fetch --suite {locked.suite}`"
        )
    images = Images(
        root=root,
        suite=locked.suite,
        kernel_package=kernel,
        kernel_release=release,
        packages=packages,
        lock_sha256=locked.sha256,
        drift=drift,
    )
    missing = [p.name for p in packages if not (root / "tree" / p.tree).is_dir()]
    if missing or not images.zimage.exists():
        raise UserError(
            f"image cache at {root} is incomplete ({', '.join(missing) or 'kernel'} missing): "
            f"run `testbench images fetch --suite {locked.suite}`"
        )
    return images


BUILT_PREFIX = "built:"


def built_dir(kind: str, name: str) -> Path:
    """Where scripts/build-kernel (kind `kernels`) and scripts/build-kexec (kind `kexec`) leave a named build:
    a directory (or a symlink to the hash-keyed one) holding `zImage` or `kexec` plus `meta.json`."""
    return cache_dir() / "built" / kind / name


def _built_file(kind: str, name: str, file: str, how: str) -> Path:
    path = built_dir(kind, name) / file
    if not path.exists():
        raise UserError(f"{BUILT_PREFIX}{name}: no such build in {path.parent.parent}; make it with `{how}`")
    return path


DEBIAN = "debian"


def debian_suite(name: str | None) -> tuple[bool, str | None]:
    """`debian` -> (True, None: the lock's default suite), `debian:SUITE` -> (True, SUITE), else (False, None)."""
    if name in (None, DEBIAN):
        return True, None
    if name.startswith(f"{DEBIAN}:"):
        suite = name.removeprefix(f"{DEBIAN}:")
        if not suite:
            raise UserError(f"{name}: name the Debian suite, e.g. {DEBIAN}:bookworm")
        return True, suite
    return False, None


def kernel_path(name: str | None) -> Path:
    """`debian` (or nothing) is the cached Debian zImage of the default suite, `debian:SUITE` that suite's,
    `built:VARIANT` a scripts/build-kernel output, anything else a path."""
    is_debian, suite = debian_suite(name)
    if is_debian:
        return load_images(suite).zimage
    assert name is not None
    if name.startswith(BUILT_PREFIX):
        variant = name.removeprefix(BUILT_PREFIX)
        return _built_file("kernels", variant, "zImage", f"scripts/build-kernel {variant}")
    return Path(name).expanduser()


def kexec_path(name: str | None) -> Path | None:
    """None for Debian's kexec-tools (`debian` or `debian:SUITE`: the cached package of that suite, see
    kexec_suite), a scripts/build-kexec output for `built:NAME`, else a path."""
    if debian_suite(name)[0]:
        return None
    assert name is not None
    if name.startswith(BUILT_PREFIX):
        built = name.removeprefix(BUILT_PREFIX)
        how = (
            "scripts/build-kexec"
            if built == "debian-src"
            else f"scripts/build-kexec --name {built} [--patch FILE] [SRC]"
        )
        return _built_file("kexec", built, "kexec", how)
    return Path(name).expanduser()


def kexec_suite(name: str | None) -> str | None:
    """The Debian suite whose kexec-tools package `name` means (None: the default suite, or not Debian's)."""
    return debian_suite(name)[1]


def loader_version(name: str | None) -> str:
    """The kexec-tools version (or rule family) the oracle should use for a loader named on the command line:
    a Debian suite's package version, a patched build's family, a build's source version; else the default."""
    from ..oracle.placement import DEFAULT_VERSION

    is_debian, suite = debian_suite(name)
    if is_debian:
        return load_images(suite).package("kexec-tools").version
    path = kexec_path(name)
    assert path is not None
    try:
        meta = json.loads((path.parent / "meta.json").read_text())
    except (OSError, ValueError):
        return DEFAULT_VERSION
    source = meta.get("source") or {}
    return patched_family(path) or str(source.get("version") or source.get("describe") or DEFAULT_VERSION)


def patched_family(binary: Path) -> str | None:
    """The oracle rule family of a loader scripts/build-kexec built with a patch from data/kexec-patches
    (data/kexec-patches/families.toml, matched by the patch's sha256 in the build's meta.json)."""
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
