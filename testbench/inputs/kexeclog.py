"""Parse `kexec --debug` output of any kexec-tools version, as pasted from a console or a mail.

Accepted: the <=2.0.12 (segments only), 2.0.13-2.0.15 ("zImage header"), 2.0.16 ("zImage has tags",
"kernel image size") and >=2.0.17 ("zImage requires", "Decompressed kernel sizes", "Kernel:", "Initrd:",
"DT    :") formats, plus the decompressor's DEBUG line `C:0x<r5>-0x<r5+size>->0x<r10>-0x<r10+size>`.

Pasted reports are messy: pasted.read_lines() strips quote markers, unflattens mail archives and takes
console lines apart from kexec's (gluing a kexec line a console line cut in two back together).

One paste may hold several kexec runs (the A80 thread holds seven). A run starts at "syscall
kexec_file_load not available.", "Try gzip decompression.", "MEMORY RANGES" or "zImage header:" when the
current run is past that point, or at whatever kexec prints after a load command shown in the paste
(`# kexec --debug -l F`); it ends at kexec's own error line ("Could not find a free area of memory",
"Cannot load", "kexec_load failed: ..."). `parse_kexec_runs` returns every run, failed ones too, with
where the paste has it, and the `C:` lines apart (testbench.inputs.attempts ties them to a run by their
numbers); `parse_kexec_logs` returns the runs that show a plan, `parse_kexec_log` the last of them.
A run whose kexec_load failed prints its segments twice: the last complete set wins. Whatever the text
does not say stays None.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from ..errors import UserError
from .pasted import PastedLine, read_lines


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
    format: str = "unknown"  # "<=2.0.12", "2.0.13-2.0.15", "2.0.16", ">=2.0.17", "tag-aware"
    tag_text_offset: int | None = None  # the tag-aware loader's "Kernel TEXT_OFFSET" line
    tag_malloc_size: int | None = None
    other_ranges: tuple[tuple[int, int, int], ...] = field(default=())  # non-RAM (start, end, type)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Failure:
    """One of kexec's own error lines ("Could not find a free area of memory of 0x... bytes...")."""

    line: int  # paste line
    text: str


@dataclass(frozen=True)
class CopyLine:
    """A decompressor `C:` line where the paste has it; which run it belongs to is for the numbers to say."""

    line: int  # paste line
    index: int  # position among read_lines(), to order it against runs on the same paste line
    text: str
    copy: DecompressorCopy


@dataclass(frozen=True)
class KexecRun:
    """One kexec run and where the paste has it: what it printed, and how far it got."""

    log: KexecLog  # with copies_apart, decompressor_copy is None: C: lines are returned on their own
    first: int  # positions among read_lines() of its first and last kexec line
    last: int
    lines: tuple[int, int]  # paste lines of the same
    failures: tuple[Failure, ...] = ()
    file_load_unavailable: bool = False  # "syscall kexec_file_load not available."
    kexec_load_path: bool = False  # my_load's "kernel: 0x... kernel_size: 0x..." (the kexec_load path)
    memory_ranges_heading: bool = False  # "MEMORY RANGES" printed, even with no range under it


_HEX = r"(?:0x)?([0-9a-fA-F]+)"
COPY = re.compile(r"C:0x([0-9a-fA-F]+)-0x([0-9a-fA-F]+)->0x([0-9a-fA-F]+)-0x([0-9a-fA-F]+)")
# A kexec invocation shown in the paste: `# build/sbin/kexec --debug --load F`, `kexec --force F ...`,
# buildroot's `run kexec with F --debug ...`. The binary is group 1, the arguments group 2.
COMMAND = re.compile(r"(?:^|[\s#$])((?:[^\s#$]*/)?kexec)(?:\s+with)?((?:\s+\S+)+)\s*$")
_LOAD_OPTIONS = {"-l", "--load", "-p", "--load-panic", "-f", "--force", "--load-preserve-context"}
# kexec's own error lines, each at the start of a line (prose quoting them has them mid-line).
_FAILURES = (
    r"^\s*(?:Could not find a free area of memory.*|Cannot load .*|Cannot determine the file type.*"
    r"|kexec_load failed: .*|kexec_file_load failed: .*|zImage is truncated.*|Invalid FDT buffer.*"
    r"|Nothing has been loaded!?|Cannot open .*|Cannot read .*|Failed to open file .*)"
)


def is_load_command(arguments: str) -> bool:
    """Whether kexec's arguments load a kernel (-l, -p, -f or a cluster holding one), not --version etc."""
    return any(t in _LOAD_OPTIONS or re.fullmatch(r"-[a-zA-Z]*[lpf][a-zA-Z]*", t) for t in arguments.split())


# Each pattern is matched in order against a cleaned line; names say what the groups fill.
_PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    ("command", COMMAND),
    ("version", re.compile(r"kexec-tools\s+(\d+\.\d+\.\d+\S*)")),
    ("fileload", re.compile(r"^\s*syscall kexec_file_load not available")),
    ("fail", re.compile(_FAILURES)),
    ("gzip", re.compile(r"Try gzip decompression")),
    ("kbuf", re.compile(rf"\bkernel:\s*{_HEX}\s+kernel_size:\s*{_HEX}")),
    ("range", re.compile(r"^\s*([0-9a-fA-F]{8,16})-([0-9a-fA-F]{8,16})\s+\((\d+)\)")),
    ("memranges", re.compile(r"^\s*MEMORY RANGES\s*$")),
    ("header", re.compile(rf"zImage header:\s*{_HEX}\s+{_HEX}\s+{_HEX}")),
    ("zsize", re.compile(rf"zImage size\s+{_HEX},\s*file size\s+{_HEX}")),
    ("requires", re.compile(rf"zImage requires\s+{_HEX}\s+bytes")),
    ("tag", re.compile(rf"offset\s+{_HEX}\s+tag\s+{_HEX}\s+size\s+(\d+)")),
    ("sizes", re.compile(rf"text\+data\s+{_HEX}\s+bss\s+{_HEX}\s+total\s+{_HEX}")),
    ("kspace", re.compile(rf"Resulting kernel space:\s*{_HEX}")),
    ("kimgsize", re.compile(rf"kernel image size:\s*{_HEX}")),
    # only from kexec-tools with images/kexec-patches/arm-zimage-tag-aware.patch: it read the tag's words
    ("tagwords", re.compile(rf"Kernel TEXT_OFFSET\s+{_HEX},\s*decompressor malloc\s+{_HEX}")),
    ("placed", re.compile(rf"\b(Kernel|Initrd|DT)\s*:\s*address={_HEX}\s+size={_HEX}")),
    ("entry", re.compile(rf"entry\s*=\s*{_HEX}")),
    ("nseg", re.compile(r"nr_segments\s*=\s*(\d+)")),
    ("seg", re.compile(rf"segment\[(\d+)\]\.(buf|bufsz|mem|memsz)\s*=\s*{_HEX}\s*$")),
    ("copy", COPY),
]

# The order a single run prints things in; a "start" marker seen after a later stage begins a new run.
# "fileload" comes first: kexec_file_load is tried (and refused, on ARM) before the kernel is read.
# A failure ends a run: kexec exits after it (the segments "kexec_load failed:" prints again stay in it).
_STAGE = {
    "fileload": 0,
    "gzip": 1,
    "kbuf": 2,
    "memranges": 3,
    "range": 3,
    "header": 4,
    "zsize": 4,
    "requires": 5,
    "tag": 5,
    "sizes": 6,
    "kspace": 6,
    "kimgsize": 6,
    "tagwords": 6,
    "placed": 7,
    "entry": 8,
    "nseg": 8,
    "seg": 8,
    "copy": 9,
    "fail": 10,
}
_STARTS = {"memranges", "header"}  # a new run when seen after a later stage
_FIRSTS = {"fileload", "gzip", "kbuf"}  # a new run when the run already got this far


class _Run:
    def __init__(self) -> None:
        self.stage = -1
        self.v: dict = {}
        self.ranges: list[tuple[int, int, int]] = []
        self.seg_sets: list[tuple[int | None, dict[int, dict[str, int]]]] = []
        self.placed: dict[str, Placed] = {}
        self.version: str | None = None
        self.span: list[tuple[int, int]] = []  # (position, paste line) of its first and last line
        self.failures: list[Failure] = []
        self.kinds: set[str] = set()

    def empty(self) -> bool:
        return self.stage < 0

    def starts_new(self, kind: str) -> bool:
        stage = _STAGE[kind]
        return (
            kind in _STARTS
            and stage < self.stage
            or kind in _FIRSTS
            and self.stage >= stage
            or kind == "memranges"
            and bool(self.ranges)
        )


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
    elif kind == "tagwords":
        v["tag_text_offset"], v["tag_malloc_size"] = _h(g[0]), _h(g[1])
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
    if "tag_text_offset" in v:
        return "tag-aware"
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
        tag_text_offset=v.get("tag_text_offset"),
        tag_malloc_size=v.get("tag_malloc_size"),
    )


def _scan(lines: Sequence[PastedLine], copies_apart: bool) -> tuple[list[_Run], list[CopyLine]]:
    """Split the kexec lines into runs; C: lines go to their own list when `copies_apart`."""
    runs: list[_Run] = [_Run()]
    copies: list[CopyLine] = []
    version = None
    boundary = False  # a kexec load command was shown: whatever kexec prints next is a new run
    for pos, pl in enumerate(lines):
        if pl.console:
            continue
        for kind, pat in _PATTERNS:
            m = pat.search(pl.text)
            if m is None:
                continue
            if kind == "command":
                if not is_load_command(m.group(2)):
                    continue  # `kexec --version`, or prose: try the other patterns
                boundary = True
                break
            if kind == "version":
                version = m.group(1)
                break
            if kind == "copy" and copies_apart:
                copies.append(CopyLine(pl.no, pos, pl.text.strip(), DecompressorCopy(*(_h(x) for x in m.groups()))))
                break
            run = runs[-1]
            if not run.empty() and (boundary or run.starts_new(kind)):
                runs.append(_Run())
                run = runs[-1]
            boundary = False
            run.stage = max(run.stage, _STAGE[kind])
            run.kinds.add(kind)
            run.span = [run.span[0] if run.span else (pos, pl.no), (pos, pl.no)]
            if run.version is None and version is not None:
                # A `kexec --version` line speaks for the run right after it only; later runs in a
                # pasted thread may come from another binary.
                run.version, version = version, None
            if kind == "fail":
                run.failures.append(Failure(pl.no, pl.text.strip()))
            else:
                _feed(run, kind, m.groups())
            break
    return [r for r in runs if not r.empty()], copies


def parse_kexec_runs(lines: Sequence[PastedLine]) -> tuple[list[KexecRun], list[CopyLine]]:
    """Every kexec run in read_lines() output, failed ones too, and the C: lines apart from them.

    A run is whatever kexec printed from one invocation: "syscall kexec_file_load not available." or
    "Try gzip decompression." through its segments or its error line. Nothing found gives two empty lists.
    """
    runs, copies = _scan(lines, copies_apart=True)
    out = [
        KexecRun(
            log=_build(r),
            first=r.span[0][0],
            last=r.span[1][0],
            lines=(r.span[0][1], r.span[1][1]),
            failures=tuple(r.failures),
            file_load_unavailable="fileload" in r.kinds,
            kexec_load_path="kbuf" in r.kinds,
            memory_ranges_heading="memranges" in r.kinds,
        )
        for r in runs
    ]
    return out, copies


def parse_kexec_logs(text: str) -> list[KexecLog]:
    """Every kexec run in the text with a plan in it, in order. Raises KexecLogError when there is none."""
    if not isinstance(text, str):
        raise KexecLogError("kexec log must be text")
    runs, _ = _scan(read_lines(text), copies_apart=False)
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
