"""Concurrency on one image cache (issue 7.6): parallel runs do not clash, parallel fetches are serialised by
the cache lock, the manifest is never read half-written, and a damaged or half-unpacked entry is never used.

The fetch tests run against a mirror of the real cache (cache_mirror.py) with a stand-in for `apt-get
download` that serves the real cache's .debs: resolving the package set from apt's metadata takes about a
minute here, and it is not what these tests are about, so it is replaced by the real manifest's package set.
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
from cache_mirror import mirror_cache

from testbench import images as images_module
from testbench.errors import BenchError, UserError
from testbench.images import Images, _write_json_atomic, fetch_images, load_images, sha256_file

ROOMY = "--kexec-args=--image-size=0x2000000"


def test_two_runs_at_once_on_one_fresh_cache(tmp_path: Path, images: Images) -> None:
    # A mirror cache without initramfs/ and loader/: both runs build them at the same moment, which is
    # exactly where two runs on one cache can clash.
    cache = tmp_path / "cache"
    mirror_cache(images.root, cache)
    env = {**os.environ, "TESTBENCH_CACHE": str(cache)}
    outs = [tmp_path / f"run{i}" for i in (1, 2)]
    started = time.monotonic()
    runners = [subprocess.Popen([sys.executable, "-m", "testbench.cli", "run", "--machine", "virt", ROOMY,
                                 "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env) for out in outs]
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
    # One shared build of each guest image, no temp files left from the race.
    assert len(list((cache / "initramfs").glob("*.cpio.gz"))) == 2
    assert not [p.name for p in (cache / "initramfs").iterdir() if p.name.startswith(".")]
    assert [p.name for p in (cache / "loader").iterdir()] == [images.package("kexec-tools").sha256[:20]]


@pytest.fixture
def fake_mirror(tmp_path: Path, images: Images, monkeypatch: pytest.MonkeyPatch) -> dict:
    """`apt-get download NAME:armhf=VERSION` served from the real cache (slowly, to widen any race), every
    call logged; the package set of the real manifest instead of a minute of apt-cache queries."""
    manifest = json.loads((images.root / "manifest.json").read_text())
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "apt-get.log"
    served = tmp_path / "served"
    served.mkdir()
    for package in manifest["packages"]:
        (served / package["name"]).symlink_to(images.root / "debs" / package["deb"])
    script = bindir / "apt-get"
    script.write_text(f"""#!/bin/sh
# stand-in mirror: $1 = download, $2 = NAME:armhf=VERSION
[ "$1" = download ] || exit 100
name="${{2%%:*}}"
echo "$name" >> {log}
sleep 1
cp "{served}/$name" "./$name.deb"
if [ -e {tmp_path}/corrupt-mirror ]; then printf 'XXXX' | dd of="./$name.deb" bs=1 seek=100 conv=notrunc 2>/dev/null; fi
""")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    wanted = {p["name"]: {"Package": p["name"], "Version": p["version"], "SHA256": p["sha256"], "Size": "0"}
              for p in manifest["packages"]}
    monkeypatch.setattr(images_module, "resolve_package_set", lambda: (manifest["kernel_package"], wanted))
    return {"manifest": manifest, "log": log, "flag": tmp_path / "corrupt-mirror"}


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


def test_parallel_fetches_repair_a_damaged_cache_once(tmp_path: Path, images: Images, fake_mirror: dict,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    manifest = fake_mirror["manifest"]
    mirror_cache(images.root, cache)
    deb, tree = _damage(cache, manifest, "libuuid1")
    monkeypatch.setenv("TESTBENCH_CACHE", str(cache))
    # A half-unpacked tree is never taken for the real one: the cache is reported incomplete.
    with pytest.raises(UserError, match="incomplete"):
        load_images()
    (cache / "manifest.json").unlink()

    outcomes: list[object] = []

    def fetch() -> None:
        try:
            outcomes.append(fetch_images(lambda s: None))
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
    written = json.loads((cache / "manifest.json").read_text())
    assert written["packages"] == manifest["packages"]
    assert load_images().packages == images.packages
    assert not [p for p in (cache / "debs").iterdir() if p.is_dir()], "temp download dirs left behind"


def test_a_bad_download_is_refused_and_the_manifest_kept(tmp_path: Path, images: Images, fake_mirror: dict,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    mirror_cache(images.root, cache)
    deb, _ = _damage(cache, fake_mirror["manifest"], "libuuid1")
    before = (cache / "manifest.json").read_bytes()
    damaged = deb.read_bytes()
    fake_mirror["flag"].touch()  # the mirror now serves a .deb whose sha256 differs from apt's metadata
    monkeypatch.setenv("TESTBENCH_CACHE", str(cache))
    with pytest.raises(BenchError, match="sha256 differs"):
        fetch_images(lambda s: None)
    assert (cache / "manifest.json").read_bytes() == before
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
