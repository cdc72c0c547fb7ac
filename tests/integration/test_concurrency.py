"""Concurrency on one image cache (issue 7.6): parallel runs do not clash, parallel fetches are serialised by
the cache lock, the manifest is never read half-written, and a damaged or half-unpacked entry is never used.

The fetch tests run against a mirror of the real cache (cache_mirror.py) with a stand-in for the suite's
private apt that serves the real cache's .debs: the archive is not what these tests are about (the lock
tests in test_lock.py use the real one).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cache_mirror import manifest_file, mirror_cache

from testbench.errors import BenchError, UserError
from testbench.fileio import sha256_file
from testbench.inputs import fetch as fetch_module
from testbench.inputs.fetch import fetch_images
from testbench.inputs.images import Images, _write_json_atomic, load_images
from testbench.inputs.lock import read_lock

ROOMY = "--kexec-args=--image-size=0x2000000"


def test_two_runs_at_once_on_one_fresh_cache(tmp_path: Path, images: Images) -> None:
    # A mirror cache without initramfs/ and loader/: both runs build them at the same moment, which is
    # exactly where two runs on one cache can clash.
    cache = tmp_path / "cache"
    mirror_cache(images.root, cache)
    env = {**os.environ, "TESTBENCH_CACHE": str(cache)}
    outs = [tmp_path / f"run{i}" for i in (1, 2)]
    started = time.monotonic()
    runners = [
        subprocess.Popen(
            [sys.executable, "-m", "testbench.cli", "run", "--machine", "virt", ROOMY, "--out", str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for out in outs
    ]
    try:
        results = [r.communicate(timeout=600) for r in runners]
    finally:
        for r in runners:
            if r.poll() is None:
                r.kill()
    print(f"two concurrent runs took {time.monotonic() - started:.1f}s")
    for runner, (stdout, stderr), out in zip(runners, results, outs, strict=True):
        assert runner.returncode == 0, (stdout, stderr)
        result = json.loads((out / "result.json").read_text())
        assert result["verdict"] == "pass" and result["phase"] == "init", result["reasons"]
        assert result["stage2"]["payload_sha256"], result["stage2"]
        assert result["inputs"]["kernel"]["sha256"] == sha256_file(images.zimage)
        # Where the Debian inputs came from: the default suite, exactly as locked.
        assert result["inputs"]["debian"] == {
            "suite": "bookworm",
            "lock_sha256": read_lock().suite(None).sha256,
            "drift": [],
        }
    # One shared build of each guest image, no temp files left from the race.
    assert len(list((cache / "initramfs").glob("*.cpio.gz"))) == 2
    assert not [p.name for p in (cache / "initramfs").iterdir() if p.name.startswith(".")]
    assert [p.name for p in (cache / "loader").iterdir()] == [images.package("kexec-tools").sha256[:20]]


@pytest.fixture
def fake_mirror(tmp_path: Path, images: Images, monkeypatch: pytest.MonkeyPatch) -> dict:
    """The suite's private apt replaced by a stand-in that serves the real cache's .debs (slowly, to widen
    any race) and logs every download: the archive itself is not what these tests are about."""
    manifest = json.loads(manifest_file(images.root).read_text())
    log = tmp_path / "apt-get.log"
    flag = tmp_path / "corrupt-mirror"
    served = {p["name"]: images.root / "debs" / p["deb"] for p in manifest["packages"]}
    versions = {p["name"]: (p["version"], p["sha256"]) for p in manifest["packages"]}

    class StandInApt:
        def __init__(self, root: Path, suite: str) -> None:
            self.suite = suite

        def update(self) -> list[str]:
            return []  # no pocket missing

        def show(self, name: str, version: str | None = None) -> dict[str, str]:
            have, sha = versions[name]
            return {"Package": name, "Version": have, "SHA256": sha} if version in (None, have) else {}

        def download(self, name: str, version: str, into: Path) -> Path:
            with log.open("a") as handle:
                handle.write(name + "\n")
            time.sleep(1)
            data = bytearray(served[name].read_bytes())
            if flag.exists():
                data[100:104] = b"XXXX"
            target = into / f"{name}.deb"
            target.write_bytes(bytes(data))
            return target

    monkeypatch.setattr(fetch_module, "PrivateApt", StandInApt)
    return {"manifest": manifest, "log": log, "flag": flag}


def _damage(cache: Path, manifest: dict, name: str) -> tuple[Path, Path]:
    """Corrupt NAME's .deb, drop its unpacked tree and leave a half-unpacked dir, as a killed fetch would."""
    package = next(p for p in manifest["packages"] if p["name"] == name)
    deb = cache / "debs" / package["deb"]
    data = bytearray(deb.read_bytes())
    data[len(data) // 2] ^= 0xFF
    deb.unlink()
    deb.write_bytes(bytes(data))
    tree = cache / "tree" / package["tree"]
    tree.unlink()
    leftover = cache / "tree" / ".unpack-killed"
    (leftover / "usr").mkdir(parents=True)
    return deb, tree


def test_parallel_fetches_repair_a_damaged_cache_once(
    tmp_path: Path, images: Images, fake_mirror: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    manifest = fake_mirror["manifest"]
    mirror_cache(images.root, cache)
    deb, tree = _damage(cache, manifest, "libuuid1")
    monkeypatch.setenv("TESTBENCH_CACHE", str(cache))
    # A half-unpacked tree is never taken for the real one: the cache is reported incomplete.
    with pytest.raises(UserError, match="incomplete"):
        load_images()
    manifest_file(cache).unlink()

    outcomes: list[object] = []

    def fetch() -> None:
        try:
            outcomes.append(fetch_images(say=lambda s: None))
        except Exception as err:  # collected and asserted on in the test thread
            outcomes.append(err)

    threads = [threading.Thread(target=fetch) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert all(isinstance(o, Images) for o in outcomes) and len(outcomes) == 2, outcomes
    # Serialised by the lock: the first fetcher re-downloaded the bad .deb, the second found it verified.
    assert fake_mirror["log"].read_text().split() == ["libuuid1"]
    package = next(p for p in manifest["packages"] if p["name"] == "libuuid1")
    assert sha256_file(deb) == package["sha256"]
    assert tree.is_dir() and not tree.is_symlink() and any(tree.rglob("libuuid.so.1*"))
    written = json.loads(manifest_file(cache).read_text())
    assert written["packages"] == manifest["packages"]
    assert load_images().packages == images.packages
    assert not [p for p in (cache / "debs").iterdir() if p.is_dir()], "temp download dirs left behind"


def test_a_bad_download_is_refused_and_the_manifest_kept(
    tmp_path: Path, images: Images, fake_mirror: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    mirror_cache(images.root, cache)
    deb, _ = _damage(cache, fake_mirror["manifest"], "libuuid1")
    before = manifest_file(cache).read_bytes()
    damaged = deb.read_bytes()
    fake_mirror["flag"].touch()  # the mirror now serves a .deb whose sha256 differs from the lock's
    monkeypatch.setenv("TESTBENCH_CACHE", str(cache))
    with pytest.raises(BenchError, match="sha256 differs"):
        fetch_images(say=lambda s: None)
    assert manifest_file(cache).read_bytes() == before
    assert deb.read_bytes() == damaged, "the refused download replaced the cached .deb"


def test_manifest_is_never_read_half_written(tmp_path: Path) -> None:
    # A reader polling while a writer rewrites a large manifest: with write-then-rename it only ever sees
    # a complete document (the old or the new), never a prefix.
    path = tmp_path / "manifest.json"
    docs = [{"n": n, "packages": [{"name": f"p{i}", "sha256": "ab" * 32} for i in range(3000)]} for n in range(2)]
    _write_json_atomic(path, docs[0])
    stop = threading.Event()

    def writer() -> None:
        for n in range(60):
            _write_json_atomic(path, docs[n % 2])
        stop.set()

    thread = threading.Thread(target=writer)
    thread.start()
    reads = 0
    while not stop.is_set():
        assert json.loads(path.read_text())["n"] in (0, 1)
        reads += 1
    thread.join()
    assert reads > 0
    assert not [p for p in tmp_path.iterdir() if p.name != "manifest.json"], "temp files left behind"
