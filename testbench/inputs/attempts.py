"""A pasted board report as kexec attempts, each with what the paste says about it.

A report is rarely one run: a mailing-list thread holds a first attempt, a second one with another kexec
version that never loaded, replies with runs on other boards, a rebuilt kernel with its own decompressor
`C:` line. `split_attempts` cuts the paste into attempts (one per kexec run, kexeclog.parse_kexec_runs)
and gives each what belongs to it:
  * the lead-in, the text between the previous attempt and this one: the kexec command shown there (its
    options, the zImage file and the version in its name, `multi-vmlinuz-5.6.0+`), and the kexec-tools
    version: a `kexec --version` output line there, else that of the same binary earlier in the paste,
    else the last one the prose names ("But kexec 2.0.18 fail to work:"); the source is recorded;
  * the kernel messages after its `Bye!` (or "Starting new kernel") and before the next attempt: they are
    the NEW kernel's (its "Linux version" banner, "Uncompressing Linux... done", "INITRD: ... overlaps
    in-use memory", a panic). A banner before the attempt is the running kernel's;
  * the decompressor `C:` line, BY ITS NUMBERS, never by position alone: `C:0x<r5>-0x<e>->...` belongs to
    a run that loaded a zImage of Z bytes at L when r5 = L + (restart & ~31), restart & ~31 a multiple of
    32 in 0..RESTART_MAX, and e = roundup32(L + Z (+ an appended DTB the decompressor uses)), head.S's own
    rounding of the copy. Among the runs it fits, the nearest before it wins (the same zImage loaded
    twice), else the nearest after it. A C: line that fits no run is returned as unattributed, never
    used: it came from another build or another load address.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, replace

from .kexeclog import COMMAND, CopyLine, Failure, KexecLog, KexecLogError, KexecRun, is_load_command, parse_kexec_runs
from .pasted import PastedLine, read_lines

ZIMAGE_MAGIC = 0x016F2818
RESTART_MAX = 0x2000  # restart & ~31 is 0xC0 without an EFI stub, ~0x10A0 with one; nothing comes near this

_VERSION_LINE = re.compile(r"^\s*kexec-tools\s+v?(\d+\.\d+\.\d+\S*)\s*$")  # the output of `kexec --version`
_VERSION_PROSE = re.compile(r"\bkexec(?:-tools?)?[ -]v?(\d+\.\d+\.\d+)\b", re.IGNORECASE)
_KERNEL_FILE_VERSION = re.compile(r"(?:vmlinuz|vmlinux|zImage|uImage|Image)[-_](\d+\.\d+[\w.+~-]*)")
# kexec options whose value is the next word (when not written --opt=value)
_VALUE_OPTIONS = {
    "--initrd",
    "--ramdisk",
    "-r",
    "--dtb",
    "--atags-file",
    "--command-line",
    "--append",
    "--image-size",
    "--mem-min",
    "--mem-max",
    "-t",
    "--type",
    "--page-offset",
}
_TS_PREFIX = re.compile(r"^\[\s*\d+\.\d+\]\s*")
# What the kernels print, each at the start of its line (after the timestamp): prose quoting them does not
# count. "bye" and "starting" are the old kernel's last words at `kexec -e`.
_MESSAGES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (kind, re.compile(pattern))
    for kind, pattern in (
        ("bye", r"^Bye!"),
        ("starting", r"^(?:\S+: )?Starting new kernel"),
        ("banner", r"^Linux version (\d+\.\d+\S*)"),
        ("uncompressing", r"^Uncompressing Linux\.\.\."),
        ("initrd-overlap", r"^INITRD: .*overlaps in-use memory"),
        ("bad-archive", r"^(?:Initramfs unpacking failed: )?invalid magic at start of compressed archive"),
        ("invalid-dtb", r"^Error: invalid dtb"),
        ("panic", r"^Kernel panic - not syncing"),
        ("oops", r"^(?:Unable to handle kernel|Internal error: Oops)"),
    )
)


@dataclass(frozen=True)
class KernelMessage:
    line: int  # paste line
    index: int  # position among read_lines()
    kind: str  # a _MESSAGES kind
    text: str


@dataclass(frozen=True)
class Command:
    """A kexec invocation the paste shows before an attempt."""

    line: int
    text: str
    binary: str
    options: tuple[str, ...]  # option names, values dropped: ("--debug", "--load", "--initrd")
    kernel_file: str | None


@dataclass(frozen=True)
class Attempt:
    index: int  # 1-based, in paste order
    lines: tuple[int, int]  # paste lines of its first and last kexec line
    log: KexecLog  # decompressor_copy is the tied C: line's, or None
    run: KexecRun
    kexec_version: str | None = None
    kexec_version_source: str | None = None  # "kexec --version", "the same binary's kexec --version", "text"
    command: Command | None = None
    kernel_version: str | None = None  # the NEW kernel's, the one kexec loaded
    kernel_version_source: str | None = None  # "banner after Bye!" or "zImage file name"
    running_kernel: str | None = None  # the banner before the attempt
    copy: CopyLine | None = None
    copy_fit: str | None = None  # the arithmetic that tied the C: line to this attempt
    executed: bool = False  # a "Bye!" or "Starting new kernel" after it
    messages: tuple[KernelMessage, ...] = ()  # the new kernel's, after the Bye!

    @property
    def failures(self) -> tuple[Failure, ...]:
        return self.run.failures

    @property
    def placed(self) -> bool:
        """kexec got as far as a plan: a Kernel: line, an entry or segments."""
        return self.log.kernel is not None or self.log.entry is not None or bool(self.log.segments)

    @property
    def complete(self) -> bool:
        """Enough to replay it: memory ranges, a Kernel: line and a DT line."""
        return bool(self.log.memory_ranges) and self.log.kernel is not None and self.log.dtb is not None


@dataclass(frozen=True)
class Unattributed:
    copy: CopyLine
    reason: str


@dataclass(frozen=True)
class Paste:
    attempts: tuple[Attempt, ...]
    unattributed: tuple[Unattributed, ...] = ()


def _command(pl: PastedLine) -> Command | None:
    m = COMMAND.search(pl.text)
    if m is None or not is_load_command(m.group(2)):
        return None
    try:
        words = shlex.split(m.group(2))
    except ValueError:  # an unbalanced quote in a pasted line
        words = m.group(2).split()
    options: list[str] = []
    kernel = None
    skip = False
    for w in words:
        if skip:
            skip = False
        elif w.startswith("-"):
            name = w.split("=", 1)[0]
            options.append(name)
            skip = name in _VALUE_OPTIONS and "=" not in w
        elif kernel is None:
            kernel = w
    return Command(pl.no, pl.text.strip(), m.group(1), tuple(options), kernel)


def _lead_in(lines: Sequence[PastedLine], binaries: dict[str, str]) -> tuple[str | None, str | None, Command | None]:
    """(kexec version, its source, the last load command) in the text before an attempt.

    `binaries` maps a kexec binary shown running `--version` to the version it printed; it is updated.
    """
    strong = prose = None
    command = None
    last_binary = None
    for pl in lines:
        if pl.console:
            continue
        m = COMMAND.search(pl.text)
        if m:
            last_binary = m.group(1)
            command = _command(pl) or command
        v = _VERSION_LINE.match(pl.text)
        if v:
            strong = v.group(1)
            if last_binary:
                binaries[last_binary] = strong
            continue
        for p in _VERSION_PROSE.finditer(pl.text):
            prose = p.group(1)
    if strong:
        return strong, "kexec --version", command
    if command and command.binary in binaries:
        return binaries[command.binary], "the same binary's kexec --version", command
    if prose:
        return prose, "text", command
    return None, None, command


def _messages(lines: Sequence[PastedLine]) -> list[KernelMessage]:
    out = []
    for pos, pl in enumerate(lines):
        text = _TS_PREFIX.sub("", pl.text.strip())
        for kind, pat in _MESSAGES:
            if pat.search(text):
                out.append(KernelMessage(pl.no, pos, kind, pl.text.strip()))
                break
    return out


def _load_and_size(log: KexecLog) -> tuple[int | None, int | None, bool]:
    """(L, Z, exact): where the zImage went and its size; exact when the header gave Z, not a segment."""
    load = log.kernel.address if log.kernel else log.entry
    if log.zimage_size is not None:
        return load, log.zimage_size, True
    seg = next((s for s in log.segments if s.mem is not None and s.mem == load), None)
    if seg is not None and seg.bufsz is not None:
        return load, seg.bufsz - 4, False  # 2.0.13+ load Z + 4 bytes; older ones the whole file
    return load, None, False


def copy_fit(copy: CopyLine, log: KexecLog, appended_dtb: Sequence[int] = ()) -> str | None:
    """The arithmetic tying a C: line to this run's load, or None when its numbers do not fit it."""
    c = copy.copy
    load, z, exact = _load_and_size(log)
    if load is None or z is None:
        return None
    head = c.src_start - load
    if not (0 <= head <= RESTART_MAX and head % 32 == 0):
        return None
    if c.dst_end - c.dst_start != c.src_end - c.src_start or c.dst_start <= c.src_start:
        return None  # not a copy head.S makes (same size, upwards): a garbled line
    for extra in (0, *appended_dtb):
        end = (load + z + extra + 31) & ~31
        if c.src_end == end or not exact and abs(c.src_end - end) <= 32:
            dtb = f" + appended DTB {extra:#x}" if extra else ""
            return (
                f"{c.src_start:#x} = load {load:#x} + (restart & ~31) {head:#x}; "
                f"{c.src_end:#x} = roundup32({load:#x} + Z {z:#x}{dtb})"
            )
    return None


def _tie_copies(
    attempts: list[Attempt], copies: Sequence[CopyLine], appended_dtb: Sequence[int]
) -> tuple[list[Attempt], list[Unattributed]]:
    unattributed = []
    for cl in copies:
        fits = [(a, why) for a in attempts if (why := copy_fit(cl, a.log, appended_dtb)) is not None]
        before = [f for f in fits if f[0].run.first < cl.index]
        after = [f for f in fits if f[0].run.first > cl.index]
        chosen = before[-1] if before else after[0] if after else None
        if chosen is None:
            unattributed.append(Unattributed(cl, _no_fit(cl, attempts)))
            continue
        a, why = attempts[chosen[0].index - 1], chosen[1]
        if a.copy is None:
            attempts[a.index - 1] = replace(a, copy=cl, copy_fit=why, log=replace(a.log, decompressor_copy=cl.copy))
        elif a.copy.copy != cl.copy:  # the same zImage at the same address copies the same way: say so
            unattributed.append(
                Unattributed(cl, f"fits attempt {a.index}, which has another C: line (line {a.copy.line})")
            )
    return attempts, unattributed


def _no_fit(cl: CopyLine, attempts: Sequence[Attempt]) -> str:
    loads = []
    for a in attempts:
        load, z, _ = _load_and_size(a.log)
        if load is not None and z is not None:
            loads.append(
                f"attempt {a.index} loads {z:#x} bytes at {load:#x} (copy {load:#x}+R..{(load + z + 31) & ~31:#x})"
            )
    c = cl.copy
    text = f"its source {c.src_start:#x}-{c.src_end:#x} fits no attempt's load address and zImage size"
    return text + (": " + "; ".join(loads) if loads else " (no attempt shows a load address)")


def split_attempts(text: str, appended_dtb: Sequence[int] = ()) -> Paste:
    """The paste's attempts, each with its lead-in, kernel messages and C: line (see the module docstring).

    `appended_dtb`: sizes (rounded to 8) of a DTB appended to the zImage that the decompressor copies too.
    Raises KexecLogError when the paste holds no kexec run at all.
    """
    if not isinstance(text, str):
        raise KexecLogError("kexec log must be text")
    lines = read_lines(text)
    runs, copies = parse_kexec_runs(lines)
    if not runs:
        raise KexecLogError(_nothing(text, lines, copies))
    messages = _messages(lines)
    binaries: dict[str, str] = {}
    attempts: list[Attempt] = []
    for i, run in enumerate(runs):
        start = runs[i - 1].last + 1 if i else 0
        version, source, command = _lead_in(lines[start : run.first], binaries)
        if version is None and run.log.kexec_version:
            version, source = run.log.kexec_version, "text"
        end = runs[i + 1].first if i + 1 < len(runs) else len(lines)
        window = [m for m in messages if run.first <= m.index < end]
        bye = next((m.index for m in window if m.kind in ("bye", "starting")), None)
        after = tuple(m for m in window if bye is not None and m.index > bye and m.kind not in ("bye", "starting"))
        banner = next((m for m in after if m.kind == "banner"), None)
        kernel_version, kv_source = None, None
        if banner is not None:
            kernel_version, kv_source = _banner_version(banner.text), "banner after Bye!"
        elif command and command.kernel_file and (fv := _KERNEL_FILE_VERSION.search(command.kernel_file)):
            kernel_version, kv_source = fv.group(1), "zImage file name"
        running = [m for m in messages if m.kind == "banner" and m.index < run.first]
        attempts.append(
            Attempt(
                index=i + 1,
                lines=run.lines,
                log=run.log,
                run=run,
                kexec_version=version,
                kexec_version_source=source,
                command=command,
                kernel_version=kernel_version,
                kernel_version_source=kv_source,
                running_kernel=_banner_version(running[-1].text) if running else None,
                executed=bye is not None,
                messages=after,
            )
        )
    attempts, unattributed = _tie_copies(attempts, copies, appended_dtb)
    return Paste(tuple(attempts), tuple(unattributed))


def _nothing(text: str, lines: Sequence[PastedLine], copies: Sequence[CopyLine]) -> str:
    """Why a paste holds no attempt, in words that say what was read."""
    physical = text.count("\n") + (not text.endswith("\n"))
    read = f"read {physical} line{'s' if physical != 1 else ''}"
    if len(lines) > physical + 1:
        read += f", {len(lines)} once a flattened mail was split at its quote markers"
    if copies:
        read += f"; {len(copies)} decompressor C: line(s), but no kexec run to tie them to"
    elif re.search(r"\bkexec\b", text):
        read += "; the text names kexec but quotes none of its --debug output"
    return (
        f"no attempt: no kexec --debug output found ({read}; expected lines such as 'MEMORY RANGES', "
        "'zImage header:', 'Kernel: address=...', 'segment[0].mem = ...')"
    )


def _banner_version(text: str) -> str | None:
    m = re.search(r"Linux version (\d+\.\d+\S*)", text)
    return m.group(1) if m else None
