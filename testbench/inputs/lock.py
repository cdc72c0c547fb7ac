"""The lock file: for each Debian suite, the exact armhf packages the guest images are made of.

`images/lock.toml` names a default suite and, per suite, every package's name, version, sha256 and size.
`testbench images fetch` installs exactly that set; `testbench images lock` rewrites one suite's table from
the archive. The file is small and of one fixed shape, so it is written here directly (and read back with
tomllib before it replaces the old one).
"""

import hashlib
import json
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from ..datafiles import data_path
from ..errors import UserError
from ..fileio import write_atomic

LOCK_ENV = "TESTBENCH_LOCK"
HEADER = """\
# The guest images' Debian packages (armhf), locked by version and sha256, one table per suite.
# `testbench images fetch [--suite S]` installs exactly this set and verifies every sha256;
# `testbench images lock [--suite S]` rewrites a suite's table from the archive (after a point release).
"""


@dataclass(frozen=True)
class LockedPackage:
    name: str
    version: str
    sha256: str
    size: int


@dataclass(frozen=True)
class SuiteLock:
    suite: str
    kernel: str  # the linux-image-*-armmp package linux-image-armmp depended on when locked
    locked_on: str
    packages: tuple[LockedPackage, ...]

    def package(self, name: str) -> LockedPackage | None:
        return next((p for p in self.packages if p.name == name), None)

    @property
    def sha256(self) -> str:
        """A digest of the locked set itself, so a manifest can say which lock it was fetched from."""
        text = json.dumps([self.suite, self.kernel, [(p.name, p.version, p.sha256) for p in self.packages]])
        return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Lock:
    path: Path
    default_suite: str
    suites: tuple[SuiteLock, ...]

    def suite(self, name: str | None) -> SuiteLock:
        wanted = name or self.default_suite
        for entry in self.suites:
            if entry.suite == wanted:
                return entry
        known = ", ".join(s.suite for s in self.suites) or "none"
        raise UserError(
            f"{self.path}: no locked set for suite {wanted!r} (locked: {known}); "
            f"make one with `testbench images lock --suite {wanted}`"
        )


def lock_path() -> Path:
    env = os.environ.get(LOCK_ENV)
    return Path(env).expanduser() if env else data_path("lock.toml")


def read_lock(path: Path | None = None) -> Lock:
    path = path or lock_path()
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"lock file {path} is missing; make it with `testbench images lock`") from None
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"lock file {path}: cannot read it ({err})") from None
    try:
        suites = tuple(
            SuiteLock(
                suite=name,
                kernel=str(table["kernel"]),
                locked_on=str(table.get("locked_on", "")),
                packages=tuple(
                    LockedPackage(
                        name=str(p["name"]), version=str(p["version"]), sha256=str(p["sha256"]), size=int(p["size"])
                    )
                    for p in table["packages"]
                ),
            )
            for name, table in raw.get("suites", {}).items()
        )
        default = str(raw["default_suite"])
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"lock file {path}: malformed ({type(err).__name__}: {err})") from None
    return Lock(path=path, default_suite=default, suites=suites)


def render(default_suite: str, suites: tuple[SuiteLock, ...]) -> str:
    lines = [HEADER, f"default_suite = {json.dumps(default_suite)}", ""]
    for entry in sorted(suites, key=lambda s: s.suite):
        lines += [
            f"[suites.{entry.suite}]",
            f"kernel = {json.dumps(entry.kernel)}",
            f"locked_on = {json.dumps(entry.locked_on)}",
            "packages = [",
        ]
        for p in sorted(entry.packages, key=lambda p: p.name):
            lines.append(
                f"  {{ name = {json.dumps(p.name)}, version = {json.dumps(p.version)}, "
                f"sha256 = {json.dumps(p.sha256)}, size = {p.size} }},"
            )
        lines += ["]", ""]
    return "\n".join(lines)


def write_suite(entry: SuiteLock, path: Path | None = None) -> Path:
    """Replace (or add) one suite's table, keeping the others and the default suite."""
    path = path or lock_path()
    if path.exists():
        old = read_lock(path)
        default, others = old.default_suite, tuple(s for s in old.suites if s.suite != entry.suite)
    else:
        default, others = entry.suite, ()
    text = render(default, (*others, entry))
    tomllib.loads(text)  # never replace a good lock with one that does not parse
    write_atomic(path, text.encode())
    return path
