"""A pasted board report as numbered lines: the one cleaning every reader of pasted text shares.

Reports come from consoles, mail archives and web forms, so before anything is matched we
  * strip mail quote prefixes ("> > ") at the start of a line;
  * unflatten a mail archive that put a whole thread on one line: a line holding three or more inline
    quote markers (" > ", " > > ") is split at them, and a piece naming two or more kexec lines ("MEMORY
    RANGES", "zImage header:", "segment[", ...) is split before each of them, so every kexec line is a
    line of its own again (a normal kexec line names exactly one);
  * take kernel console lines (`[   71.039126] ...`) apart from the text, and where a console line cut a
    kexec line in two (`segment[2].mem = 0x2[ 31.265096] eth0: Link is Down` + newline + `2648000`) glue
    the halves back.
Console lines are kept (flagged), because they carry what the new kernel said after kexec's `Bye!`.
Every line keeps the number of the paste line it starts on, so a report can name the lines it read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_TS = re.compile(r"\[\s*\d+\.\d+\]")
_QUOTE = re.compile(r"^[ \t]*(?:>[ \t]?)+")
# An inline quote marker: blanks, then ">" (or "> >"), then blanks or the end. "->" in a C: line and
# "a>b" have no blank before the ">", so they are not markers.
_INLINE_QUOTE = re.compile(r"[ \t]+>(?:[ \t]*>)*(?:[ \t]+|$)")
FLATTENED_MARKERS = 3  # fewer inline markers is a shell redirect or a comparison, not a flattened mail
# The first words of the kexec --debug lines the readers take; one of them per line in a normal log.
_HEADS = re.compile(
    r"Try gzip decompression|syscall kexec_file_load|\bkernel: 0x|MEMORY RANGES"
    r"|\b[0-9a-fA-F]{8,16}-[0-9a-fA-F]{8,16}\s+\(\d+\)|zImage (?:header|size|requires|has tags)"
    r"|\boffset 0x|Decompressed kernel sizes|text\+data |Resulting kernel space|kernel image size"
    r"|\b(?:Kernel|Initrd|DT)\s*:\s*address=|kexec_load: |nr_segments|segment\[\d+\]|\bC:0x"
    r"|Could not find a free area|Cannot load |kexec_load failed"
)


@dataclass(frozen=True)
class PastedLine:
    no: int  # 1-based number of the paste line it starts on
    text: str  # quote markers off; a kexec line cut by a console line glued back together
    console: bool  # a kernel console line, or the console tail that cut a kexec line


def _split_heads(piece: str) -> list[str]:
    starts = [m.start() for m in _HEADS.finditer(piece)]
    if len(starts) < 2:
        return [piece]
    cuts = ([0] if starts[0] > 0 else []) + starts + [len(piece)]
    return [piece[a:b].rstrip() for a, b in zip(cuts, cuts[1:], strict=False) if piece[a:b].strip()]


def _unflatten(line: str) -> list[str]:
    """One physical line as the lines it stands for (itself, unless a mail archive flattened a thread)."""
    pieces = _INLINE_QUOTE.split(line) if len(_INLINE_QUOTE.findall(line)) >= FLATTENED_MARKERS else [line]
    return [part for piece in pieces for part in _split_heads(piece)]


def read_lines(text: str) -> list[PastedLine]:
    """The paste's text lines and console lines, in order (see the module docstring)."""
    pieces = [
        (no, piece)
        for no, raw in enumerate(text.split("\n"), 1)
        for piece in _unflatten(_QUOTE.sub("", raw).rstrip("\r"))
    ]
    out: list[PastedLine] = []
    pending: tuple[int, str] | None = None  # a kexec fragment cut by a console line, waiting for its tail
    for no, piece in pieces:
        start, line = (pending[0], pending[1] + piece) if pending else (no, piece)
        pending = None
        m = _TS.search(line)
        if m is None:
            out.append(PastedLine(start, line, False))
            continue
        if m.start() > 0 and line[: m.start()].strip():
            pending = (start, line[: m.start()])
        out.append(PastedLine(no, line[m.start() :], True))
    if pending:
        out.append(PastedLine(pending[0], pending[1], False))
    return out


def clean_lines(text: str) -> list[str]:
    """The text lines alone: quote prefixes off, console lines out, cut kexec lines glued back together."""
    return [line.text for line in read_lines(text) if not line.console]
