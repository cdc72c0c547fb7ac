"""A private image cache whose .debs and unpacked trees are symlinks into the real one.

Cheap (no copy of ~45 MB of packages or ~100 MB of trees) and safe: tests damage or rebuild entries of the
mirror, and everything the bench writes (manifest, initramfs, loader bundle, replaced .debs) lands in the
mirror, never in the real cache.
"""

from __future__ import annotations

import json
from pathlib import Path


def manifest_file(cache: Path, suite: str = "bookworm") -> Path:
    return cache / "suites" / suite / "manifest.json"


def mirror_cache(real: Path, fake: Path, suite: str = "bookworm") -> dict:
    (fake / "debs").mkdir(parents=True)
    (fake / "tree").mkdir()
    manifest = json.loads(manifest_file(real, suite).read_text())
    for package in manifest["packages"]:
        (fake / "debs" / package["deb"]).symlink_to(real / "debs" / package["deb"])
        (fake / "tree" / package["tree"]).symlink_to(real / "tree" / package["tree"])
    manifest_file(fake, suite).parent.mkdir(parents=True)
    manifest_file(fake, suite).write_text(json.dumps(manifest, indent=2))
    return manifest
