"""A private apt configuration for one Debian suite's armhf packages, independent of the host's sources.

The guest images must be the same on a Debian 12 and a Debian 13 host, so nothing the host's apt resolves
(its suite, its pins, its enabled architectures, its package lists) may reach them. Each suite gets its own
sources list, lists, status file and archives dir under `<cache>/apt/<suite>/`, with armhf as the only
architecture and the Debian archive keyring as the only trust. What is taken from the host is only how it
reaches the archive: the mirror URIs it is configured with (never a host name written here) and its
`Acquire` settings (proxies and the like), which say nothing about what gets resolved.
"""

import os
import pwd
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..errors import BenchError, UserError

ARCH = "armhf"
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
# `apt-get update` of one suite's three armhf indexes is ~10 MB; a stalled mirror must not hang setup.
UPDATE_TIMEOUT = 600.0
QUERY_TIMEOUT = 120.0
DOWNLOAD_TIMEOUT = 900.0


@dataclass(frozen=True)
class Mirrors:
    """Where the host's apt reaches Debian: the archive and its security archive."""

    archive: str
    security: str


def host_mirrors() -> Mirrors:
    """The host's configured Debian mirrors, read from `apt-get indextargets` (deb822 and one-line sources
    alike). TESTBENCH_APT_MIRROR / TESTBENCH_APT_SECURITY override them (a local mirror, a snapshot)."""
    archive = os.environ.get("TESTBENCH_APT_MIRROR")
    security = os.environ.get("TESTBENCH_APT_SECURITY")
    if not archive or not security:
        found_archive, found_security = _indextarget_mirrors()
        archive = archive or found_archive
        # Debian publishes security updates in a sibling archive, `debian-security` beside `debian`.
        security = (
            security or found_security or (re.sub(r"/debian/?$", "/debian-security/", archive) if archive else None)
        )
    if not archive or not security:
        raise UserError(
            "the host's apt has no Debian mirror configured (no `deb` source for a Debian suite); "
            "set TESTBENCH_APT_MIRROR (and TESTBENCH_APT_SECURITY) to the archive's URI"
        )
    return Mirrors(archive=archive.rstrip("/") + "/", security=security.rstrip("/") + "/")


def _indextarget_mirrors() -> tuple[str | None, str | None]:
    try:
        done = subprocess.run(
            ["apt-get", "indextargets", "--format", "$(REPO_URI)|$(RELEASE)|$(ORIGIN)"],
            capture_output=True,
            text=True,
            timeout=QUERY_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None, None
    archive = security = None
    for line in sorted(set(done.stdout.splitlines())):
        uri, _, rest = line.partition("|")
        release, _, origin = rest.partition("|")
        if origin not in ("Debian", "$(ORIGIN)", ""):
            continue  # a third-party repository (nodesource, a cloud SDK) is not a Debian mirror
        if release.endswith("-security"):
            security = security or uri
        elif "-" not in release and uri.rstrip("/").endswith("/debian"):
            archive = archive or uri
    return archive, security


class PrivateApt:
    """apt-get / apt-cache run against one suite's private state. Every call names its whole configuration
    on the command line, so the host's sources, lists and preferences are never read."""

    def __init__(self, root: Path, suite: str, mirrors: Mirrors | None = None, sources_too: bool = False):
        self.suite = suite
        # `sources_too`: deb-src entries as well, for scripts/build-kexec debian-src:SUITE (own state dir, so
        # the image lists stay binary-only and small)
        self.sources_too = sources_too
        self.dir = root / "apt" / (f"{suite}-src" if sources_too else suite)
        self._mirrors = mirrors
        self._prepared = False

    @property
    def mirrors(self) -> Mirrors:
        if self._mirrors is None:
            self._mirrors = host_mirrors()
        return self._mirrors

    def sources(self) -> str:
        m = self.mirrors
        common = f"Components: main\nArchitectures: {ARCH}\nSigned-By: {KEYRING}\n"
        types = "deb deb-src" if self.sources_too else "deb"
        return (
            f"Types: {types}\nURIs: {m.archive}\nSuites: {self.suite} {self.suite}-updates\n{common}\n"
            f"Types: {types}\nURIs: {m.security}\nSuites: {self.suite}-security\n{common}"
        )

    def _prepare(self) -> None:
        """The private state's dirs and sources, written once per instance (resolving a set is ~40 calls)."""
        if self._prepared:
            return
        if not KEYRING.is_file():
            raise UserError(f"{KEYRING} is missing; install it with `apt-get install debian-archive-keyring`")
        for sub in ("sources.list.d", "preferences.d", "trusted.gpg.d", "lists/partial", "archives/partial"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        (self.dir / "sources.list.d" / "debian.sources").write_text(self.sources())
        (self.dir / "status").touch()
        self._prepared = True

    def options(self) -> list[str]:
        d = self.dir
        settings = {
            "Dir::Etc::SourceList": d / "sources.list",  # absent: only the deb822 file below
            "Dir::Etc::SourceParts": d / "sources.list.d",
            "Dir::Etc::Preferences": d / "preferences",
            "Dir::Etc::PreferencesParts": d / "preferences.d",
            "Dir::Etc::Trusted": d / "trusted.gpg",
            "Dir::Etc::TrustedParts": d / "trusted.gpg.d",
            "Dir::State": d,
            "Dir::State::Lists": d / "lists",
            "Dir::State::status": d / "status",
            "Dir::Cache": d,
            "Dir::Cache::archives": d / "archives",
            "Dir::Cache::pkgcache": "",
            "Dir::Cache::srcpkgcache": "",
            "APT::Architecture": ARCH,
            "APT::Default-Release": "",
            # apt drops to the _apt user to download, who cannot write into a cache under $HOME.
            "APT::Sandbox::User": pwd.getpwuid(os.getuid()).pw_name,
        }
        options = [f"-o{key}={value}" for key, value in settings.items()]
        return [*options, f"-oAPT::Architectures={ARCH}", "-oAcquire::Languages=none"]

    def _run(
        self, tool: str, args: list[str], timeout: float, cwd: Path | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        self._prepare()
        cmd = [tool, *self.options(), *args]
        try:
            done = subprocess.run(
                cmd, cwd=cwd, capture_output=True, text=True, errors="replace", timeout=timeout, check=False
            )
        except FileNotFoundError:
            raise UserError(f"{tool} not found: the guest images are fetched with Debian's apt") from None
        except subprocess.TimeoutExpired:
            raise BenchError(
                f"{tool} {' '.join(args)} did not finish within {timeout:.0f}s (is the mirror reachable?)"
            ) from None
        if check and done.returncode != 0:
            lines = _errors(done.stderr) or done.stderr.strip().splitlines()[-1:]
            raise BenchError(
                f"{tool} {' '.join(args)} ({self.suite}, private apt) failed: {' | '.join(lines) or done.returncode}"
            )
        return done

    def update(self) -> list[str]:
        """Refresh the private lists; returns a note per update pocket (-updates, -security) the archive no
        longer serves for armhf (bullseye-security after its LTS ended), which is not an error."""
        done = self._run("apt-get", ["update", "-q"], UPDATE_TIMEOUT, check=False)
        errors = _errors(done.stderr)
        pockets = [e for e in errors if _pocket(self.suite, e)]
        no_release = [e for e in errors if "does not have a Release file" in e and e not in pockets]
        if no_release or (done.returncode == 0 and not self.has_lists()):
            raise UserError(
                f"Debian suite {self.suite!r}: the mirror {self.mirrors.archive} has no such suite "
                "for armhf (a codename such as bullseye, bookworm or trixie)"
            )
        fatal = [e for e in errors if e not in pockets and "Some index files failed to download" not in e]
        if not self.has_lists() or (done.returncode != 0 and (fatal or not pockets)):
            raise BenchError(f"apt-get update ({self.suite}, private apt) failed: {' | '.join(errors[:3])}")
        # the pocket's name, not apt's URL: which mirror serves the machine is its configuration
        names = dict.fromkeys(_pocket(self.suite, e) for e in pockets)  # each a name: the filter above
        return [f"{self.suite}: the mirror does not serve {name}; skipped" for name in names]

    def has_lists(self) -> bool:
        return any((self.dir / "lists").glob(f"*_dists_{self.suite}_main_binary-{ARCH}_Packages*"))

    def show(self, name: str, version: str | None = None) -> dict[str, str]:
        """The fields of NAME (the candidate, or exactly VERSION); empty when the archive has no such armhf
        package (an Architecture: all one such as debconf, a virtual one, a version gone from the archive)."""
        spec = f"{name}:{ARCH}" + (f"={version}" if version else "")
        done = self._run("apt-cache", ["show", "--no-all-versions", spec], QUERY_TIMEOUT, check=False)
        return parse_stanza(done.stdout) if done.returncode == 0 else {}

    def download(self, name: str, version: str, into: Path) -> Path:
        """Download one exact package version into INTO (apt checks it against the signed index)."""
        self._run("apt-get", ["download", "-q", f"{name}:{ARCH}={version}"], DOWNLOAD_TIMEOUT, cwd=into)
        found = sorted(into.glob(f"{name}_*.deb"))
        if not found:
            raise BenchError(f"apt-get download {name}={version} left no .deb")
        return found[0]


def _pocket(suite: str, error: str) -> str | None:
    """The update pocket (SUITE-security, SUITE-updates) an apt error line is about, if any."""
    match = re.search(rf"\b{re.escape(suite)}-(security|updates)\b", error)
    return match.group(0) if match else None


def _errors(stderr: str) -> list[str]:
    """apt's error lines (E: ..., Err: ...), the ones worth quoting."""
    return [line for line in stderr.splitlines() if line.startswith(("E:", "Err"))]


def parse_stanza(text: str) -> dict[str, str]:
    """The first stanza of a Debian control text as a field dict (continuation lines joined)."""
    fields: dict[str, str] = {}
    key = ""
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        if line[0].isspace() and key:
            fields[key] += "\n" + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def dependency_names(fields: dict[str, str]) -> list[str]:
    names = []
    for key in ("Pre-Depends", "Depends"):
        for clause in filter(None, (c.strip() for c in fields.get(key, "").split(","))):
            first = clause.split("|")[0].strip()
            names.append(re.split(r"[\s(:]", first, maxsplit=1)[0])
    return names


def main(argv: list[str] | None = None) -> int:
    """`python -m testbench.inputs.apt source-options SUITE`: update a private apt with SUITE's deb-src
    entries and print the apt options that use it, one per line (scripts/build-kexec debian-src:SUITE)."""
    import sys

    from .images import cache_dir

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] != "source-options":
        print("usage: python -m testbench.inputs.apt source-options SUITE", file=sys.stderr)
        return 2
    apt = PrivateApt(cache_dir(), args[1], sources_too=True)
    try:
        for note in apt.update():
            print(note, file=sys.stderr)
    except (UserError, BenchError) as err:
        print(f"testbench: {err}", file=sys.stderr)
        return 2
    print("\n".join(apt.options()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
