"""What the second kernel's init checks of the stage-2 payload, and what the host expects it to report.

`full`: the sha256 of the whole /payload.bin. `sample`: the sha256 of its size (a decimal line) followed by
its first and last 64 KiB block and SAMPLE_COUNT blocks picked by a seeded LCG, which data/stage2/init
computes the same way.
A sample is enough when the observer ran: it proved every byte of the initrd segment intact at the kernel
entry, so what stage 2 still has to show is that the kernel found that initrd and unpacked this payload
from it (a hash of 100 MB in emulated busybox costs ~5 s; 34 blocks cost well under one). Without the
observer nothing else proves the bytes, so the check is the full hash; a small payload is hashed in full
anyway, and `--full-hash` asks for the full hash always.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .fileio import write_atomic

SAMPLE_COUNT = 16
SAMPLE_BLOCK = 64 << 10
FULL_UP_TO = 4 << 20  # a sample of 34 blocks would cover half of such a payload: hash all of it
CMDLINE_KEY = "tb.payload"  # a dotted word: the kernel treats it as a module option and hands it to no one
# The LCG of the init script: x <- (x * A + C) mod 2^31, block = x mod blocks (64-bit shell arithmetic).
LCG_A, LCG_C, LCG_M = 1103515245, 12345, 1 << 31


@dataclass(frozen=True)
class PayloadCheck:
    mode: str  # "full" | "sample"
    count: int = 0
    block: int = 0
    seed: int = 0

    @property
    def spec(self) -> str:
        """As the init reports it in the marker, and as the command line carries it."""
        return "full" if self.mode == "full" else f"sample:{self.count}:{self.block}:{self.seed}"

    @property
    def cmdline_word(self) -> str | None:
        return None if self.mode == "full" else f"{CMDLINE_KEY}={self.spec}"

    def describe(self) -> str:
        if self.mode == "full":
            return "sha256 of the whole payload"
        return (
            f"sha256 of the size and a sample: first, last and {self.count} seeded blocks of "
            f"{self.block >> 10} KiB, seed {self.seed}"
        )

    def blocks(self, size: int) -> list[int]:
        """The block indices the init hashes, in order (repeats included: the init does not sort them)."""
        total = max(1, -(-size // self.block))
        picks = [0, total - 1]
        x = self.seed
        for _ in range(self.count):
            x = (x * LCG_A + LCG_C) % LCG_M
            picks.append(x % total)
        return picks

    def digest(self, payload: bytes) -> str:
        if self.mode == "full":
            return hashlib.sha256(payload).hexdigest()
        h = hashlib.sha256(b"%d\n" % len(payload))
        for index in self.blocks(len(payload)):
            h.update(payload[index * self.block : (index + 1) * self.block])
        return h.hexdigest()


FULL = PayloadCheck("full")


def choose(observing: bool, full_hash: bool, payload_size: int, seed: int) -> PayloadCheck:
    if full_hash or not observing or payload_size <= FULL_UP_TO:
        return FULL
    return PayloadCheck("sample", SAMPLE_COUNT, SAMPLE_BLOCK, seed)


def parse_spec(spec: str | None) -> PayloadCheck:
    """The marker's `payload_check`; an init without one (older images) hashed the whole payload."""
    if not spec or spec == "full":
        return FULL
    mode, *numbers = spec.split(":")
    try:
        count, block, seed = (int(n) for n in numbers)
    except ValueError:
        return PayloadCheck(mode)  # unparsable: judged as a mismatch by its spec string
    return PayloadCheck(mode, count, block, seed)


def expected_digest(check: PayloadCheck, payload, full_sha256: str, size: int, cache_dir: Path) -> str:
    """What a correct init reports for a generated payload. `payload()` regenerates its bytes (SHAKE-256 of
    the seed, ~0.4 s per 100 MB), so a sample's digest is computed once per (size, seed, sample) and kept
    in `cache_dir` beside the generated initrds."""
    if check.mode == "full":
        return full_sha256
    memo = cache_dir / f"payload-{size}-{full_sha256[:16]}-{check.spec.replace(':', '-')}.json"
    try:
        return str(json.loads(memo.read_text())["digest"])
    except (OSError, ValueError, KeyError):
        pass
    digest = check.digest(payload())
    write_atomic(memo, (json.dumps({"digest": digest}) + "\n").encode())
    return digest
