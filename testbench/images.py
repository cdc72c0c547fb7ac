"""Guest inputs: Debian armhf packages fetched with apt-get, unpacked into a sha256-keyed cache.

The cache lives outside git ($TESTBENCH_CACHE, default ~/.cache/testbench). `fetch_images()` resolves the
package set from apt's metadata (the kernel that linux-image-armmp depends on, busybox-static, kexec-tools
and the shared libraries it needs), downloads what is missing, checks each .deb against the sha256 apt
advertises, unpacks it into `tree/<sha256>/` and writes `manifest.json` last, atomically. `load_images()`
only reads the manifest, so a run never downloads; with TESTBENCH_OFFLINE=1 fetching is refused too.
"""

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import BenchError, UserError

ARCH = "armhf"
KERNEL_METAPACKAGE = "linux-image-armmp"
ROOT_PACKAGES = ("busybox-static", "kexec-tools")
# Only dependencies in these sections are followed: they hold the shared objects kexec needs, whereas
# debconf, dpkg or tar (section admin/utils) are packaging machinery a static guest never runs.
LIBRARY_SECTIONS = {"libs"}


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
class Images:
    """Paths into the unpacked cache, plus the provenance of every package."""

    root: Path
    kernel_package: str
    kernel_release: str
    packages: tuple[Package, ...]

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

    @property
    def modules_dir(self) -> Path:
        return self.tree(self.kernel_package) / "lib" / "modules" / self.kernel_release

    @property
    def dtb_dir(self) -> Path:
        return self.tree(self.kernel_package) / "usr" / "lib" / f"linux-image-{self.kernel_release}"

    @property
    def busybox(self) -> Path:
        return self.tree("busybox-static") / "bin" / "busybox"

    @property
    def kexec(self) -> Path:
        return self.tree("kexec-tools") / "sbin" / "kexec"

    def library_trees(self) -> list[Path]:
        return [self.root / "tree" / p.tree for p in self.packages if p.name not in (self.kernel_package,
                                                                                     "busybox-static",
                                                                                     "kexec-tools")]


# --- apt metadata ---------------------------------------------------------------------------------


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise BenchError(f"{cmd[0]} not found; run scripts/setup on a Debian 12 machine") from None
    if done.returncode != 0:
        raise BenchError(f"{' '.join(cmd)} failed: {done.stderr.strip().splitlines()[-1:] or done.returncode}")
    return done.stdout


def _show(name: str) -> dict[str, str]:
    """The candidate version's fields from `apt-cache show`; empty when apt has no armhf package of that name
    (an Architecture: all package such as debconf, or a virtual one)."""
    done = subprocess.run(["apt-cache", "show", "--no-all-versions", f"{name}:{ARCH}"],
                          capture_output=True, text=True, check=False)
    out = done.stdout if done.returncode == 0 else ""
    fields: dict[str, str] = {}
    key = ""
    for line in out.splitlines():
        if not line.strip():
            break  # only the first (candidate) stanza
        if line[0].isspace() and key:
            fields[key] += "\n" + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def _show_required(name: str) -> dict[str, str]:
    fields = _show(name)
    if "Package" not in fields:
        raise BenchError(
            f"apt knows no {name}:{ARCH}; run `dpkg --add-architecture {ARCH} && apt-get update` (scripts/setup)"
        )
    return fields


def _dependency_names(fields: dict[str, str]) -> list[str]:
    names = []
    for key in ("Pre-Depends", "Depends"):
        for clause in filter(None, (c.strip() for c in fields.get(key, "").split(","))):
            first = clause.split("|")[0].strip()
            names.append(re.split(r"[\s(:]", first, maxsplit=1)[0])
    return names


def kernel_package_name() -> str:
    for name in _dependency_names(_show_required(KERNEL_METAPACKAGE)):
        if name.startswith("linux-image-") and name.endswith("-armmp"):
            return name
    raise BenchError(f"{KERNEL_METAPACKAGE}:{ARCH} does not depend on a linux-image-*-armmp package")


def resolve_package_set() -> tuple[str, dict[str, dict[str, str]]]:
    """The kernel package name and the apt fields of every package to fetch (roots + library closure)."""
    kernel = kernel_package_name()
    wanted: dict[str, dict[str, str]] = {}
    queue = [kernel, *ROOT_PACKAGES]
    roots = set(queue)
    while queue:
        name = queue.pop()
        if name in wanted:
            continue
        fields = _show_required(name) if name in roots else _show(name)
        if name not in roots and (fields.get("Section") not in LIBRARY_SECTIONS
                                  or fields.get("Architecture") != ARCH):
            continue
        wanted[name] = fields
        if name != kernel:  # the kernel's dependencies (initramfs tools, firmware) are host-side tooling
            queue.extend(_dependency_names(fields))
    return kernel, wanted


# --- fetching -------------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def _cache_lock(root: Path) -> Iterator[None]:
    """One fetcher at a time per cache; readers only look at the manifest, which is written atomically."""
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def write_atomic(path: Path, data: bytes) -> None:
    """Write via a temp file beside `path` and rename: a concurrent reader sees the old file or the whole
    new one, never half of it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _write_json_atomic(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=2).encode())


def _fetch_one(root: Path, fields: dict[str, str], say: Callable[[str], None]) -> Package:
    name, version, sha = fields["Package"], fields["Version"], fields["SHA256"]
    debs, trees = root / "debs", root / "tree"
    debs.mkdir(exist_ok=True)
    trees.mkdir(exist_ok=True)
    deb = debs / f"{name}_{version.replace(':', '%3a')}_{ARCH}.deb"
    if not (deb.exists() and sha256_file(deb) == sha):
        say(f"downloading {name} {version} ({int(fields.get('Size', 0)) >> 10} KiB)")
        with tempfile.TemporaryDirectory(dir=debs) as tmp:
            _run(["apt-get", "download", f"{name}:{ARCH}={version}"], cwd=Path(tmp))
            got = next(Path(tmp).glob("*.deb"))
            if sha256_file(got) != sha:
                raise BenchError(f"{got.name}: sha256 differs from apt's metadata; refusing to use it")
            os.replace(got, deb)
    tree = trees / sha
    if not tree.is_dir():
        say(f"unpacking {name}")
        tmp_tree = Path(tempfile.mkdtemp(dir=trees, prefix=".unpack-"))
        try:
            _run(["dpkg-deb", "-x", str(deb), str(tmp_tree)])
            os.replace(tmp_tree, tree)
        finally:
            shutil.rmtree(tmp_tree, ignore_errors=True)
    return Package(name=name, version=version, sha256=sha, deb=deb.name, tree=sha)


def fetch_images(say: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> Images:
    root = cache_dir()
    if offline():
        say("TESTBENCH_OFFLINE is set: using the cache as it is")
        return load_images()
    with _cache_lock(root):
        say("resolving Debian armhf packages from apt metadata")
        kernel, wanted = resolve_package_set()
        packages = tuple(_fetch_one(root, wanted[name], say) for name in sorted(wanted))
        kernel_tree = root / "tree" / next(p.tree for p in packages if p.name == kernel)
        release = kernel.removeprefix("linux-image-")
        _depmod(kernel_tree, release)
        manifest = {
            "kernel_package": kernel,
            "kernel_release": release,
            "packages": [p.to_dict() | {"tree": p.tree} for p in packages],
        }
        _write_json_atomic(root / "manifest.json", manifest)
        say(f"image cache ready in {root}: {len(packages)} packages, kernel {release}")
        return load_images()


def _depmod(kernel_tree: Path, release: str) -> None:
    # modules.dep is not shipped in the .deb; generate it on the host, once per unpacked kernel.
    if not (kernel_tree / "lib" / "modules" / release / "modules.dep").exists():
        depmod = shutil.which("depmod") or "/usr/sbin/depmod"
        _run([depmod, "-b", str(kernel_tree), release])


def load_images() -> Images:
    root = cache_dir()
    manifest_path = root / "manifest.json"
    if not manifest_path.exists():
        hint = "unset TESTBENCH_OFFLINE and run" if offline() else "run"
        raise UserError(f"no image cache at {root}: {hint} `testbench images fetch` (or scripts/setup)")
    manifest = json.loads(manifest_path.read_text())
    packages = tuple(Package(name=p["name"], version=p["version"], sha256=p["sha256"], deb=p["deb"],
                             tree=p["tree"]) for p in manifest["packages"])
    images = Images(root=root, kernel_package=manifest["kernel_package"],
                    kernel_release=manifest["kernel_release"], packages=packages)
    missing = [p.name for p in packages if not (root / "tree" / p.tree).is_dir()]
    if missing or not images.zimage.exists():
        raise UserError(f"image cache at {root} is incomplete ({', '.join(missing) or 'kernel'} missing): "
                        "run `testbench images fetch`")
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


def kernel_path(name: str | None) -> Path:
    """`debian` (or nothing) is the cached Debian zImage, `built:VARIANT` a scripts/build-kernel output,
    anything else a path."""
    if name in (None, "debian"):
        return load_images().zimage
    if name.startswith(BUILT_PREFIX):
        variant = name.removeprefix(BUILT_PREFIX)
        return _built_file("kernels", variant, "zImage", f"scripts/build-kernel {variant}")
    return Path(name).expanduser()


def kexec_path(name: str | None) -> Path | None:
    """None for Debian's kexec-tools (the cached package), a scripts/build-kexec output for `built:NAME`,
    else a path."""
    if name in (None, "debian"):
        return None
    if name.startswith(BUILT_PREFIX):
        built = name.removeprefix(BUILT_PREFIX)
        how = "scripts/build-kexec" if built == "debian-src" else f"scripts/build-kexec --name {built} SRC"
        return _built_file("kexec", built, "kexec", how)
    return Path(name).expanduser()
