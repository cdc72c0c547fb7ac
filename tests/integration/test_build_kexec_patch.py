"""scripts/build-kexec --patch: patches applied in order to Debian's kexec-tools source (or to a copy of a
given checkout), recorded in meta.json and in the cache key; a patch that does not apply is one line and exit 2,
with the given tree untouched and nothing left in the cache.

Real builds (apt-get source, the armhf cross toolchain, configure, make -j1) in a private TESTBENCH_CACHE, so
every run builds from nothing: ~40 s on 2 cores. Skipped, with the reason, when apt cannot be used (not root
and no passwordless sudo, no network, no source package).
"""

import hashlib
import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from testbench.fileio import sha256_file
from testbench.inputs.checks import check_kexec

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "build-kexec"
PATCH = ROOT / "testbench" / "data" / "kexec-patches" / "arm-zimage-tag-aware.patch"
PATCHED_FILE = "kexec/arch/arm/kexec-zImage-arm.c"
# The line the patch adds, as it ends up in the binary's rodata: proof that the build compiled the patch.
DEBUG_LINE = b"Kernel TEXT_OFFSET 0x%08lx, decompressor malloc 0x%08lx\n"
# What scripts/build-kexec says when apt, not the script, is what is missing here.
APT_TROUBLE = ("apt-get install", "apt knows no kexec-tools source package", "apt-get source kexec-tools", "sudo")


def build(cache: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "TESTBENCH_CACHE": str(cache)}
    return subprocess.run([str(SCRIPT), "-j", "1", *args], capture_output=True, text=True, env=env, timeout=timeout)


def error_lines(done: subprocess.CompletedProcess) -> list[str]:
    """stderr without the script's progress lines."""
    return [line for line in done.stderr.splitlines() if not line.startswith("[build-kexec] ")]


def assert_one_line_error(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert done.stdout == ""
    lines = error_lines(done)
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("build-kexec: "), lines[0]
    return lines[0]


def tree_state(root: Path) -> dict[str, tuple]:
    """Every entry under root: type, mode, mtime and content (sha256, or the link target)."""
    state: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                content = os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                content = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                content = ""
            state[str(path.relative_to(root))] = (stat.S_IFMT(st.st_mode), st.st_mode, st.st_mtime_ns, content)
    return state


def cache_entries(cache: Path) -> set[str]:
    kexec_root = cache / "built" / "kexec"
    return {p.name for p in kexec_root.iterdir() if not p.name.startswith(".lock-")} if kexec_root.is_dir() else set()


def meta(cache: Path, name: str) -> dict:
    return json.loads((cache / "built" / "kexec" / name / "meta.json").read_text())


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("kexec-cache")


@pytest.fixture(scope="module")
def unpatched(cache: Path) -> Path:
    """The plain build of Debian's source (it also installs the toolchain and the deb-src entries)."""
    if os.geteuid() != 0 and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode != 0:
        pytest.skip("scripts/build-kexec needs root or passwordless sudo for apt-get")
    done = build(cache)
    if done.returncode != 0 and any(what in done.stderr for what in APT_TROUBLE):
        pytest.skip(f"apt cannot provide kexec-tools' source or the toolchain here: {error_lines(done) or done.stderr}")
    assert done.returncode == 0, done.stderr
    return Path(done.stdout.strip())


@pytest.fixture(scope="module")
def debian_tree(unpatched: Path, tmp_path_factory) -> Path:
    """Debian's kexec-tools source unpacked once, to pass as SRC (a real kexec-tools tree, never built in)."""
    where = tmp_path_factory.mktemp("debian-source")
    done = subprocess.run(["apt-get", "source", "-q", "kexec-tools"], cwd=where, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"apt-get source kexec-tools failed: {done.stderr.strip().splitlines()[-1:]}")
    (tree,) = where.glob("kexec-tools-*/")
    return tree


@pytest.fixture
def broken_patch(tmp_path: Path) -> Path:
    """Our patch with a context line of its first hunk changed: the hunk no longer matches 2.0.25."""
    text = PATCH.read_text()
    context = " \t\t\tuint32_t bss_size;\n"
    assert text.count(context) == 1
    path = tmp_path / "broken.patch"
    path.write_text(text.replace(context, " \t\t\tuint32_t bss_bytes;\n"))
    return path


def test_missing_or_bogus_patch_is_one_line_before_any_work(tmp_path):
    cache = tmp_path / "cache"
    not_a_diff = tmp_path / "notes.txt"
    not_a_diff.write_text("not a diff\n")
    for patch, why in (
        (tmp_path / "nope.patch", "no such file"),
        (tmp_path, "not a regular file"),
        (not_a_diff, "not a unified diff"),
    ):
        # Together with a good patch, first or second: every patch is checked before anything runs.
        for args in (("--patch", str(patch)), ("--patch", str(PATCH), f"--patch={patch}")):
            line = assert_one_line_error(build(cache, *args, timeout=60))
            assert line == f"build-kexec: --patch {patch}: {why}" or line.startswith(
                f"build-kexec: --patch {patch}: {why} "
            ), line
            assert not cache.exists()  # not even the cache directory: nothing ran


def test_patch_that_does_not_apply_leaves_the_tree_and_the_cache_alone(cache, debian_tree, broken_patch):
    before, entries = tree_state(debian_tree), cache_entries(cache)
    done = build(cache, "--name", "broken", "--patch", str(broken_patch), str(debian_tree))
    assert assert_one_line_error(done) == (
        f"build-kexec: {broken_patch} does not apply to {debian_tree}: {PATCHED_FILE}: hunk #1 FAILED at 131"
    )
    assert tree_state(debian_tree) == before
    assert cache_entries(cache) == entries  # no half-built sha256-* entry, no `broken` link, no .work-* dir


def test_patches_apply_in_order_and_the_failing_one_is_named(cache, debian_tree, tmp_path):
    again = tmp_path / "again.patch"
    shutil.copyfile(PATCH, again)
    before, entries = tree_state(debian_tree), cache_entries(cache)
    done = build(cache, "--patch", str(PATCH), "--patch", str(again), str(debian_tree))
    assert assert_one_line_error(done) == (
        f"build-kexec: {again} does not apply to {debian_tree} after {PATCH.name}: "
        f"{PATCHED_FILE}: already applied (or reversed)"
    )
    # A patch for a file the tree does not have names that file.
    elsewhere = tmp_path / "elsewhere.patch"
    elsewhere.write_text(PATCH.read_text().replace(PATCHED_FILE, "kexec/arch/arm/no-such-file.c"))
    done = build(cache, "--patch", str(elsewhere), str(debian_tree))
    assert assert_one_line_error(done).startswith(
        f"build-kexec: {elsewhere} does not apply to {debian_tree}: kexec/arch/arm/no-such-file.c: no such file"
    )
    assert tree_state(debian_tree) == before
    assert cache_entries(cache) == entries


def test_patched_debian_source_build(cache, unpatched):
    done = build(cache, "--patch", str(PATCH), "--name", "tag-aware")
    assert done.returncode == 0, done.stderr
    kexec = Path(done.stdout.strip())
    assert kexec == cache / "built" / "kexec" / "tag-aware" / "kexec"
    assert not check_kexec(kexec).dynamic  # a static 32-bit ARM ELF
    patched, plain = meta(cache, "tag-aware"), meta(cache, "debian-src")
    assert patched["patches"] == [{"name": PATCH.name, "sha256": sha256_file(PATCH)}]
    assert plain["patches"] == []
    assert patched["source"] == plain["source"]  # the same Debian source package...
    assert patched["key"] != plain["key"]  # ...but never the same cache entry
    assert (cache / "built" / "kexec" / "tag-aware").resolve() != (cache / "built" / "kexec" / "debian-src").resolve()
    assert patched["sha256"] == sha256_file(kexec) != plain["sha256"] == sha256_file(unpatched)
    # The patch is in the binary, and only there.
    assert DEBUG_LINE in kexec.read_bytes()
    assert DEBUG_LINE not in unpatched.read_bytes()
    # Both stay cached under their own keys, whichever is asked for.
    for args, name in (((), "debian-src"), (("--patch", str(PATCH), "--name", "tag-aware"), "tag-aware")):
        again = build(cache, *args, timeout=120)
        assert again.returncode == 0, again.stderr
        assert "cached:" in again.stderr
        assert meta(cache, name)["key"] == (patched if name == "tag-aware" else plain)["key"]


def test_patched_checkout_build_never_writes_the_checkout(cache, debian_tree, unpatched):
    before = tree_state(debian_tree)
    done = build(cache, "--patch", str(PATCH), str(debian_tree))
    assert done.returncode == 0, done.stderr
    assert tree_state(debian_tree) == before
    # The default name says which patch went in: the tree's version plus the patch's stem.
    name = "2.0.25+arm-zimage-tag-aware"
    assert Path(done.stdout.strip()) == cache / "built" / "kexec" / name / "kexec"
    got = meta(cache, name)
    assert got["source"]["kind"] == "checkout" and got["source"]["path"] == str(debian_tree)
    assert got["patches"] == [{"name": PATCH.name, "sha256": sha256_file(PATCH)}]
    assert DEBUG_LINE in (cache / "built" / "kexec" / name / "kexec").read_bytes()
