"""The guest's serial console: a unix socket read by a thread into a buffer and console.log.

Every wait has a deadline (scaled by TESTBENCH_TIMEOUT_FACTOR; none at all when a debugger is attached)
and a timeout quotes the last console lines, so a hang explains itself.
"""

import contextlib
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, overload

from ..deadlines import factor as timeout_factor
from ..errors import BenchError

TAIL_LINES = 50


class ConsoleTimeout(BenchError):
    def __init__(self, what: str, seconds: float, tail: str):
        super().__init__(f"timed out after {seconds:.0f}s waiting for {what}; last console lines:\n{tail}")
        self.what = what
        self.tail = tail


class ConsoleClosed(BenchError):
    """QEMU went away (poweroff, -no-reboot on a panic, or a crash) while we were waiting."""

    def __init__(self, what: str, tail: str):
        super().__init__(f"console closed (QEMU exited) while waiting for {what}")
        self.what = what
        self.tail = tail


@dataclass(frozen=True)
class Match:
    pattern: str
    match: re.Match[str]
    offset: int  # where in the console text the match ends: the next wait starts here
    at: float  # monotonic time the matching text arrived (well, was first seen)


class Console:
    def __init__(
        self,
        sock_path: Path,
        log_path: Path,
        debugger_attached: bool = False,
        files_dir: Path | None = None,
        halt_lines: tuple[str, ...] = (),
        on_halt: Callable[[], None] | None = None,
    ):
        # Where files the guest sends back over this console land (guest.Shell decodes them; share.py)
        self.files_dir = files_dir
        # A board that can neither reset nor power off prints one of `halt_lines` and stays: `on_halt` ends
        # QEMU then, so a wait sees the console close as it would after a poweroff (machines.toml halt_lines)
        self._halt_lines, self._on_halt = halt_lines, on_halt
        self._halt_from = 0  # where the next search for a halt line starts
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.connect(str(sock_path))
        self._log = log_path.open("wb", buffering=0)  # one run per case dir: a rerun replaces the log
        self._text = ""
        self._closed = False
        self.last_data_at = time.monotonic()
        self._cond = threading.Condition()
        self.no_deadlines = debugger_attached
        self._reader = threading.Thread(target=self._read, name="console-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = self._sock.recv(65536)
            except OSError:
                data = b""
            if data:
                self._log.write(data)
            with self._cond:
                if not data:
                    self._closed = True
                    self._cond.notify_all()
                    return
                # The kernel writes CRLF; normalise so patterns can use \n and $.
                self.last_data_at = time.monotonic()
                self._text += data.decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "")
                self._cond.notify_all()
                halted = self._halted()
            if halted and self._on_halt is not None:
                self._on_halt()

    def _halted(self) -> bool:
        """A halt line arrived (called with the lock held; true once)."""
        if not self._halt_lines or self._halt_from < 0:
            return False
        window = self._text[self._halt_from :]
        if any(line in window for line in self._halt_lines):
            self._halt_from = -1
            return True
        self._halt_from = max(0, len(self._text) - max(map(len, self._halt_lines)))
        return False

    @property
    def text(self) -> str:
        with self._cond:
            return self._text

    @property
    def offset(self) -> int:
        return len(self.text)

    def tail(self, lines: int = TAIL_LINES) -> str:
        return "\n".join(self.text.splitlines()[-lines:])

    def write(self, data: str) -> None:
        self._sock.sendall(data.encode())

    @overload
    def wait_for(
        self, patterns: str | list[str], timeout: float, what: str, start: int = 0, fail_on_close: Literal[True] = True
    ) -> Match: ...

    @overload
    def wait_for(
        self, patterns: str | list[str], timeout: float, what: str, start: int = 0, *, fail_on_close: bool
    ) -> Match | None: ...

    def wait_for(
        self, patterns: str | list[str], timeout: float, what: str, start: int = 0, fail_on_close: bool = True
    ) -> Match | None:
        """Wait until one of the regex patterns appears in the console text after `start`.

        Returns None instead of raising when the console closes and `fail_on_close` is false.
        """
        compiled = [re.compile(p, re.MULTILINE) for p in ([patterns] if isinstance(patterns, str) else patterns)]
        scaled = timeout * timeout_factor()
        deadline = None if self.no_deadlines else time.monotonic() + scaled
        with self._cond:
            while True:
                window = self._text[start:]
                found = [(m.start(), p, m) for p in compiled if (m := p.search(window))]
                if found:
                    _, pattern, match = min(found, key=lambda f: f[0])
                    return Match(pattern.pattern, match, start + match.end(), time.monotonic())
                if self._closed:
                    if fail_on_close:
                        raise ConsoleClosed(what, self.tail())
                    return None
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise ConsoleTimeout(what, scaled, self.tail())
                self._cond.wait(timeout=remaining if remaining is None else min(remaining, 1.0))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._reader.join(timeout=2)
        self._log.close()
