"""Drive the stage-1 busybox shell: one command at a time, each bracketed by unique markers with its $?.

The markers are typed as `TB""B-...` so the shell's echo of the typed line never matches the pattern that
only the command's own output can produce. On a board whose share is read only for the guest (the
initramfs transport), files the command sent back with `tb-put` are written to the console's `files_dir`
before `run` returns, and left out of its output.
"""

import itertools
import secrets
import time
from dataclasses import dataclass

from .console import Console
from .share import receive

READY = r"TESTBENCH-STAGE1-READY"
PROMPT = r"tb1\$ "


@dataclass(frozen=True)
class CommandResult:
    command: str
    rc: int
    output: str
    seconds: float


class Shell:
    def __init__(self, console: Console):
        self.console = console
        self.nonce = secrets.token_hex(4)
        self._counter = itertools.count(1)
        self._offset = 0

    def wait_ready(self, timeout: float) -> float:
        """Wait for the stage-1 init's ready line and its prompt; returns the guest uptime it reported."""
        # Patterns that capture a value end at the newline: the console is matched as it streams in, and
        # `$` would also match the end of a half-received line ("...-2" of an exit status 253).
        ready = self.console.wait_for(READY + r" ([\d.]+)\n", timeout, "the stage-1 shell")
        prompt = self.console.wait_for(PROMPT, timeout, "the stage-1 prompt", ready.offset)
        self._offset = prompt.offset
        return float(ready.match.group(1))

    def run(self, command: str, timeout: float, what: str) -> CommandResult:
        n = next(self._counter)
        begin, end = f"TBB-{self.nonce}-{n}", f"TBE-{self.nonce}-{n}"
        started = time.monotonic()
        self.console.write(f'echo TB""B-{self.nonce}-{n}; {command}; echo TB""E-{self.nonce}-{n}-$?\n')
        first = self.console.wait_for(rf"^{begin}\n", timeout, what, self._offset)
        last = self.console.wait_for(rf"^{end}-(\d+)\n", timeout, what, first.offset)
        self._offset = last.offset
        output = self.console.text[first.offset : last.offset - len(last.match.group(0))]
        if self.console.files_dir is not None:
            output = receive(output, self.console.files_dir)
        return CommandResult(command, int(last.match.group(1)), output.rstrip("\n"), time.monotonic() - started)

    def send(self, command: str) -> int:
        """Type a command whose end we will not see (kexec -e); returns the console offset before it."""
        offset = self.console.offset
        self.console.write(command + "\n")
        return offset
