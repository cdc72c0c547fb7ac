"""Parse `kexec --debug` output of any kexec-tools version, as pasted from a console or a mail.

Accepted: the <=2.0.12 (segments only), 2.0.13-2.0.15 ("zImage header"), 2.0.16 ("zImage has tags",
"kernel image size") and >=2.0.17 ("zImage requires", "Decompressed kernel sizes", "Kernel:", "Initrd:",
"DT    :") formats, plus the decompressor's DEBUG line `C:0x<r5>-0x<r5+size>->0x<r10>-0x<r10+size>`.

Pasted reports are messy, so before matching we
  * strip mail quote prefixes ("> > "),
  * drop kernel console lines (`[   71.039126] ...`), and where a console line cut a kexec line in two
    (`segment[2].mem = 0x2[ 31.265096] eth0: Link is Down` + newline + `2648000`) glue the halves back.

One paste may hold several kexec runs (the A80 thread holds seven); `parse_kexec_logs` returns them all and
`parse_kexec_log` the last one. A run whose kexec_load was retried prints its segments twice: the last
complete set wins. Whatever the text does not say stays None.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from ..errors import UserError


class KexecLogError(UserError):
    """The text holds no kexec --debug output."""


@dataclass(frozen=True)
class Segment:
    index: int
    buf: int | None
    bufsz: int | None
    mem: int | None
    memsz: int | None


@dataclass(frozen=True)
class Placed:
    """One of kexec's "Kernel:", "Initrd:" or "DT    :" lines."""

    address: int
    size: int


@dataclass(frozen=True)
class DecompressorCopy:
    """The decompressor's `C:` line: it copied [src_start, src_end) to [dst_start, dst_end)."""

    src_start: int  # L + (restart & ~31)
    src_end: int
    dst_start: int  # the relocation destination r10
    dst_end: int


@dataclass(frozen=True)
class KexecLog:
    memory_ranges: tuple[tuple[int, int], ...]  # System RAM (type 0), (start, end_exclusive)
    zimage_size: int | None
    file_size: int | None
    zimage_requires: int | None
    tag_offset: int | None
    tag_size: int | None
    text_data: int | None
    bss: int | None
    total: int | None
    kernel_space: int | None
    kernel: Placed | None
    initrd: Placed | None
    dtb: Placed | None
    entry: int | None
    segments: tuple[Segment, ...]
    decompressor_copy: DecompressorCopy | None
    header: tuple[int, int, int] | None = None  # "zImage header: magic start end"
    kernel_image_size: int | None = None  # 2.0.16 "kernel image size"
    kexec_version: str | None = None  # from a `kexec --version` line in the paste
    format: str = "unknown"  # "<=2.0.12", "2.0.13-2.0.15", "2.0.16", ">=2.0.17"
    other_ranges: tuple[tuple[int, int, int], ...] = field(default=())  # non-RAM (start, end, type)

    def to_dict(self) -> dict:
        return asdict(self)


_TS = re.compile(r"\[\s*\d+\.\d+\]")
_QUOTE = re.compile(r"^[ \t]*(?:>[ \t]?)+")
_HEX = r"(?:0x)?([0-9a-fA-F]+)"

# Each pattern is matched in order against a cleaned line; names say what the groups fill.
_PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    ("version", re.compile(r"kexec-tools\s+(\d+\.\d+\.\d+\S*)")),
    ("gzip", re.compile(r"Try gzip decompression")),
    ("range", re.compile(r"^\s*([0-9a-fA-F]{8,16})-([0-9a-fA-F]{8,16})\s+\((\d+)\)")),
    ("memranges", re.compile(r"MEMORY RANGES")),
    ("header", re.compile(rf"zImage header:\s*{_HEX}\s+{_HEX}\s+{_HEX}")),
    ("zsize", re.compile(rf"zImage size\s+{_HEX},\s*file size\s+{_HEX}")),
    ("requires", re.compile(rf"zImage requires\s+{_HEX}\s+bytes")),
    ("tag", re.compile(rf"offset\s+{_HEX}\s+tag\s+{_HEX}\s+size\s+(\d+)")),
    ("sizes", re.compile(rf"text\+data\s+{_HEX}\s+bss\s+{_HEX}\s+total\s+{_HEX}")),
    ("kspace", re.compile(rf"Resulting kernel space:\s*{_HEX}")),
    ("kimgsize", re.compile(rf"kernel image size:\s*{_HEX}")),
    ("placed", re.compile(rf"\b(Kernel|Initrd|DT)\s*:\s*address={_HEX}\s+size={_HEX}")),
    ("entry", re.compile(rf"entry\s*=\s*{_HEX}")),
    ("nseg", re.compile(r"nr_segments\s*=\s*(\d+)")),
    ("seg", re.compile(rf"segment\[(\d+)\]\.(buf|bufsz|mem|memsz)\s*=\s*{_HEX}\s*$")),
    ("copy", re.compile(r"C:0x([0-9a-fA-F]+)-0x([0-9a-fA-F]+)->0x([0-9a-fA-F]+)-0x([0-9a-fA-F]+)")),
]

# The order a single run prints things in; a "start" marker seen after a later stage begins a new run.
_STAGE = {
    "gzip": 0,
    "memranges": 1,
    "range": 1,
    "header": 2,
    "zsize": 2,
    "requires": 3,
    "tag": 3,
    "sizes": 4,
    "kspace": 4,
    "kimgsize": 4,
    "placed": 5,
    "entry": 6,
    "nseg": 6,
    "seg": 6,
    "copy": 7,
}
_STARTS = {"gzip", "memranges", "header"}


def clean_lines(text: str) -> list[str]:
    """Quote prefixes off, console lines out, cut kexec lines glued back together."""
    raw = [_QUOTE.sub("", line).rstrip("\r") for line in text.split("\n")]
    out: list[str] = []
    pending = ""  # a kexec fragment cut by a console line, waiting for its tail
    for line in raw:
        line = pending + line
        pending = ""
        m = _TS.search(line)
        if m is None:
            out.append(line)
        elif m.start() > 0 and line[: m.start()].strip():
            pending = line[: m.start()]
        # else: a whole console line, dropped
    if pending:
        out.append(pending)
    return out


class _Run:
    def __init__(self) -> None:
        self.stage = -1
        self.v: dict = {}
        self.ranges: list[tuple[int, int, int]] = []
        self.seg_sets: list[tuple[int | None, dict[int, dict[str, int]]]] = []
        self.placed: dict[str, Placed] = {}
        self.version: str | None = None

    def empty(self) -> bool:
        return self.stage < 0


def _h(s: str) -> int:
    return int(s, 16)


def _feed(run: _Run, kind: str, g: tuple[str, ...]) -> None:
    v = run.v
    if kind == "range":
        run.ranges.append((_h(g[0]), _h(g[1]) + 1, int(g[2])))
    elif kind == "header":
        v["header"] = (_h(g[0]), _h(g[1]), _h(g[2]))
    elif kind == "zsize":
        v["zimage_size"], v["file_size"] = _h(g[0]), _h(g[1])
    elif kind == "requires":
        v["zimage_requires"] = _h(g[0])
    elif kind == "tag":
        v["tag_offset"], v["tag_size"] = _h(g[0]), int(g[2])
    elif kind == "sizes":
        v["text_data"], v["bss"], v["total"] = _h(g[0]), _h(g[1]), _h(g[2])
    elif kind == "kspace":
        v["kernel_space"] = _h(g[0])
    elif kind == "kimgsize":
        v["kernel_image_size"] = _h(g[0])
    elif kind == "placed":
        run.placed[g[0]] = Placed(_h(g[1]), _h(g[2]))
    elif kind == "entry":
        v["entry"] = _h(g[0])
        run.seg_sets.append((None, {}))
    elif kind == "nseg":
        if not run.seg_sets or run.seg_sets[-1][0] is not None or run.seg_sets[-1][1]:
            run.seg_sets.append((None, {}))
        run.seg_sets[-1] = (int(g[0]), run.seg_sets[-1][1])
    elif kind == "seg":
        if not run.seg_sets:
            run.seg_sets.append((None, {}))
        run.seg_sets[-1][1].setdefault(int(g[0]), {})[g[1]] = _h(g[2])
    elif kind == "copy":
        v["decompressor_copy"] = DecompressorCopy(*(_h(x) for x in g))


def _segments(run: _Run) -> tuple[Segment, ...]:
    def complete(n: int | None, segs: dict[int, dict[str, int]]) -> bool:
        want = n if n is not None else len(segs)
        return want > 0 and all(len(segs.get(i, {})) == 4 for i in range(want))

    sets = [s for s in run.seg_sets if s[1]]
    if not sets:
        return ()
    chosen = next((s for s in reversed(sets) if complete(*s)), sets[-1])
    n, segs = chosen
    count = max(n or 0, max(segs) + 1)
    return tuple(Segment(i, *(segs.get(i, {}).get(k) for k in ("buf", "bufsz", "mem", "memsz"))) for i in range(count))


def _format(v: dict) -> str:
    if "zimage_requires" in v or "kernel_space" in v or "text_data" in v:
        return ">=2.0.17"
    if "kernel_image_size" in v:
        return "2.0.16"
    if "header" in v or "zimage_size" in v:
        return "2.0.13-2.0.15"
    return "<=2.0.12"


def _build(run: _Run) -> KexecLog:
    v = run.v
    return KexecLog(
        memory_ranges=tuple((s, e) for s, e, t in run.ranges if t == 0),
        zimage_size=v.get("zimage_size"),
        file_size=v.get("file_size"),
        zimage_requires=v.get("zimage_requires"),
        tag_offset=v.get("tag_offset"),
        tag_size=v.get("tag_size"),
        text_data=v.get("text_data"),
        bss=v.get("bss"),
        total=v.get("total"),
        kernel_space=v.get("kernel_space"),
        kernel=run.placed.get("Kernel"),
        initrd=run.placed.get("Initrd"),
        dtb=run.placed.get("DT"),
        entry=v.get("entry"),
        segments=_segments(run),
        decompressor_copy=v.get("decompressor_copy"),
        header=v.get("header"),
        kernel_image_size=v.get("kernel_image_size"),
        kexec_version=run.version,
        format=_format(v),
        other_ranges=tuple(r for r in run.ranges if r[2] != 0),
    )


def parse_kexec_logs(text: str) -> list[KexecLog]:
    """Every kexec run in the text, in order. Raises KexecLogError when there is none."""
    if not isinstance(text, str):
        raise KexecLogError("kexec log must be text")
    runs: list[_Run] = [_Run()]
    version = None
    for line in clean_lines(text):
        for kind, pat in _PATTERNS:
            m = pat.search(line)
            if m is None:
                continue
            if kind == "version":
                version = m.group(1)
                break
            run = runs[-1]
            stage = _STAGE[kind]
            new_run = (
                kind in _STARTS
                and stage < run.stage
                or kind == "gzip"
                and not run.empty()
                or kind == "memranges"
                and bool(run.ranges)
            )
            if new_run:
                runs.append(_Run())
                run = runs[-1]
            run.stage = max(run.stage, stage)
            if run.version is None and version is not None:
                # A `kexec --version` line speaks for the run right after it only; later runs in a
                # pasted thread may come from another binary.
                run.version, version = version, None
            _feed(run, kind, m.groups())
            break
    logs = [_build(r) for r in runs if _meaningful(r)]
    if not logs:
        raise KexecLogError(
            "no kexec --debug output found (expected lines such as 'MEMORY RANGES', "
            "'zImage header:', 'segment[0].mem = ...')"
        )
    return logs


def _meaningful(run: _Run) -> bool:
    keys = {"header", "zimage_size", "text_data", "decompressor_copy"}
    return bool(run.ranges or run.seg_sets or run.placed or keys & set(run.v))


def parse_kexec_log(text: str) -> KexecLog:
    """The last kexec run in the text (a board report usually ends with the run that matters)."""
    return parse_kexec_logs(text)[-1]
