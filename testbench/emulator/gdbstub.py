"""A small gdb remote-protocol client for QEMU's gdbstub on a unix socket.

Only what the bench needs: hardware breakpoints, registers, memory writes, continue, interrupt, detach.
Protocol facts learned against QEMU 7.2 (DOMAIN.md 8.4):
  * QEMU may send a stop reply as soon as we connect; `connect()` drains it.
  * We never advertise `multiprocess+`: with it, `D` answers E22 and the VM stays paused.
  * `p`/`P` (one register) answer empty until the client has read the target description
    (`qXfer:features:read:target.xml`), so `connect()` reads it; it also names SCTLR and CPSR.
  * A breakpoint must be removed before continuing from it, or the CPU stops again at once.
  * With -smp N every vCPU is a thread (ids 1..N). Breakpoints apply to all of them; a stop reply names
    the thread that stopped (`T05thread:01;`) and `g`/`p`/`m` read the thread chosen with `Hg`, so each
    stop selects its thread before reading registers, and a single step moves that thread alone (vCont).
"""

from __future__ import annotations

import contextlib
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from ..deadlines import budget
from ..errors import BenchError

ACK = b"+"
INTERRUPT = b"\x03"
ESCAPED = b"#$}*"  # bytes that must be escaped in binary data (and '*' because of run-length encoding)
# Bytes of memory per M packet (hex, so twice that on the wire): QEMU 7.2 takes packets up to 4 KiB and
# answers X (binary write) with an empty reply, i.e. unsupported.
WRITE_CHUNK = 1792
# M packets in flight before their replies are read: QEMU answers them in order, and a round trip per
# packet (not the bytes) is what made filling 20 MiB of RAM take seconds.
WRITE_WINDOW = 64
READ_CHUNK = 1792  # bytes per m packet: the hex reply must fit the same 4 KiB packet buffer


class GdbError(BenchError):
    pass


def checksum(payload: bytes) -> int:
    return sum(payload) & 0xFF


def frame(payload: bytes) -> bytes:
    """`$payload#cc`, cc the modulo-256 sum of the payload bytes in two lower-case hex digits."""
    return b"$" + payload + b"#" + f"{checksum(payload):02x}".encode()


def escape(data: bytes) -> bytes:
    """Binary data for X packets: `}` followed by the byte XOR 0x20 for each of # $ } *."""
    out = bytearray()
    for b in data:
        if b in ESCAPED:
            out += bytes((0x7D, b ^ 0x20))
        else:
            out.append(b)
    return bytes(out)


def unescape(data: bytes) -> bytes:
    out = bytearray()
    it = iter(data)
    for b in it:
        out.append(next(it) ^ 0x20 if b == 0x7D else b)
    return bytes(out)


def decode_rle(payload: bytes) -> bytes:
    """Expand run-length encoding: `X*n` repeats X (ord(n) - 29) more times."""
    out = bytearray()
    i = 0
    while i < len(payload):
        if payload[i] == ord("*") and out and i + 1 < len(payload):
            out += bytes((out[-1],)) * (payload[i + 1] - 29)
            i += 2
        else:
            out.append(payload[i])
            i += 1
    return bytes(out)


def parse_packet(buffer: bytes) -> tuple[bytes | None, bytes]:
    """Take one `$...#cc` packet off the front of `buffer`: (payload or None if incomplete, rest).

    Raises GdbError on a bad checksum (the caller would NACK; QEMU on a unix socket never corrupts).
    """
    start = buffer.find(b"$")
    if start < 0:
        return None, b""
    end = buffer.find(b"#", start)
    if end < 0 or len(buffer) < end + 3:
        return None, buffer[start:]
    payload = buffer[start + 1 : end]
    given = int(buffer[end + 1 : end + 3], 16)
    if given != checksum(payload):
        raise GdbError(f"gdb packet checksum {given:02x} != {checksum(payload):02x}")
    return decode_rle(payload), buffer[end + 3 :]


def le_words(hexdata: str, count: int) -> list[int]:
    """Registers in a `g` reply are target-endian (little on ARM) words in hex."""
    return [int.from_bytes(bytes.fromhex(hexdata[8 * i : 8 * i + 8]), "little") for i in range(count)]


@dataclass(frozen=True)
class Stop:
    signal: int
    pc: int
    regs: tuple[int, ...]  # r0-r15
    at: float  # monotonic time the stop reply arrived
    thread: int | None = None  # the vCPU (gdb thread id, 1-based) that stopped, when the reply names it


class GdbStub:
    def __init__(self, path: Path, timeout: float | None = None):
        self.path = path
        self.timeout = budget("gdb_reply") if timeout is None else timeout
        self._sock: socket.socket | None = None
        self._buf = b""
        self.regnums: dict[str, int] = {}
        self.acks = True  # until QStartNoAckMode is accepted

    def __enter__(self) -> GdbStub:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(self.timeout)
        try:
            self._sock.connect(str(self.path))
        except OSError as err:
            raise GdbError(f"cannot connect to the gdbstub at {self.path}: {err}") from None
        self._drain(0.2)
        self.command(b"qSupported:xmlRegisters=arm")
        # Without acks a bulk write is one send per window of packets instead of one more per reply.
        self.acks = self.command(b"QStartNoAckMode") != b"OK"
        self.regnums = self._read_target_description()

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None

    # --- transport -------------------------------------------------------------------------------------
    def _recv(self, deadline: float | None) -> bytes:
        assert self._sock is not None
        if deadline is not None:
            self._sock.settimeout(max(0.01, deadline - time.monotonic()))
        else:
            self._sock.settimeout(None)
        try:
            data = self._sock.recv(65536)
        except TimeoutError:
            return b""
        if not data:
            raise GdbError("gdbstub closed the connection (QEMU exited?)")
        return data

    def _drain(self, seconds: float) -> None:
        """Swallow whatever QEMU sends unasked (the stop reply on connect), acknowledging packets."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            data = self._recv(deadline)
            if not data:
                break
            self._buf += data
            while True:
                payload, self._buf = parse_packet(self._buf)
                if payload is None:
                    break
                self._send_raw(ACK)
        self._buf = b""

    def _send_raw(self, data: bytes) -> None:
        assert self._sock is not None
        try:
            self._sock.sendall(data)
        except OSError as err:  # QEMU went away (poweroff, panic=-1, killed): a GdbError, not a traceback
            raise GdbError(f"gdbstub connection lost ({err.strerror or err})") from None

    def _read_packet(self, deadline: float | None) -> bytes | None:
        while True:
            self._buf = self._buf.lstrip(ACK)
            payload, rest = parse_packet(self._buf)
            if payload is not None:
                self._buf = rest
                if self.acks:
                    self._send_raw(ACK)
                return payload
            if deadline is not None and time.monotonic() >= deadline:
                return None
            self._buf += self._recv(deadline)

    def command(self, payload: bytes, timeout: float | None = None) -> bytes:
        self._send_raw(frame(payload))
        reply = self._read_packet(time.monotonic() + (timeout or self.timeout))
        if reply is None:
            raise GdbError(f"no gdbstub reply to {payload[:20]!r}")
        return reply

    def ok(self, payload: bytes) -> None:
        reply = self.command(payload)
        if reply != b"OK":
            raise GdbError(f"gdbstub answered {reply!r} to {payload[:40]!r}")

    # --- target description ----------------------------------------------------------------------------
    def _xfer(self, annex: str) -> str:
        out = b""
        while True:
            reply = self.command(f"qXfer:features:read:{annex}:{len(out):x},{0xF00:x}".encode())
            if not reply or reply[:1] not in b"ml":
                raise GdbError(f"qXfer {annex}: {reply[:40]!r}")
            out += unescape(reply[1:])
            if reply[:1] == b"l":
                return out.decode(errors="replace")

    def _read_target_description(self) -> dict[str, int]:
        """Register name -> number, numbered in document order as gdb does (honouring regnum=)."""
        target = self._xfer("target.xml")
        names: dict[str, int] = {}
        number = 0
        for href in re.findall(r'<xi:include href="([^"]+)"', target) or ["target.xml"]:
            text = target if href == "target.xml" else self._xfer(href)
            for reg in re.finditer(r"<reg\s[^>]*>", text):
                attrs = dict(re.findall(r'(\w+)="([^"]*)"', reg.group(0)))
                if "regnum" in attrs:
                    number = int(attrs["regnum"])
                names.setdefault(attrs.get("name", ""), number)
                number += 1
        return names

    # --- registers and memory --------------------------------------------------------------------------
    def select(self, thread: int) -> None:
        """Registers and memory are read from this vCPU from now on (QEMU's g_cpu)."""
        self.ok(f"Hg{thread:x}".encode())

    def threads(self) -> list[int]:
        """The vCPUs, as gdb thread ids."""
        found: list[int] = []
        reply = self.command(b"qfThreadInfo")
        while reply.startswith(b"m"):
            found += [int(t, 16) for t in reply[1:].decode().split(",") if t]
            reply = self.command(b"qsThreadInfo")
        return found

    def registers(self) -> tuple[int, ...]:
        reply = self.command(b"g").decode()
        if len(reply) < 16 * 8 or reply.startswith("E"):
            raise GdbError(f"bad g reply {reply[:20]!r}")
        return tuple(le_words(reply, 16))

    def read_register(self, name: str) -> int | None:
        number = self.regnums.get(name)
        if number is None:
            return None
        reply = self.command(f"p{number:x}".encode()).decode()
        if not reply or reply.startswith("E"):
            return None
        return int.from_bytes(bytes.fromhex(reply[:8]), "little")

    def write_register(self, name: str, value: int) -> None:
        number = self.regnums.get(name)
        if number is None:
            raise GdbError(f"register {name} not in the target description")
        self.ok(f"P{number:x}={value.to_bytes(4, 'little').hex()}".encode())

    def write_memory(self, address: int, data: bytes) -> None:
        offsets = list(range(0, len(data), WRITE_CHUNK))
        for first in range(0, len(offsets), WRITE_WINDOW):
            window = offsets[first : first + WRITE_WINDOW]
            chunks = [(off, data[off : off + WRITE_CHUNK]) for off in window]
            self._send_raw(
                b"".join(frame(f"M{address + off:x},{len(chunk):x}:{chunk.hex()}".encode()) for off, chunk in chunks)
            )
            for off in window:
                reply = self._read_packet(time.monotonic() + self.timeout)
                if reply != b"OK":
                    raise GdbError(f"memory write at {address + off:#x} failed: {reply!r}")

    def read_memory(self, address: int, length: int) -> bytes:
        """Guest physical memory while the MMU is off (the bench only reads during boot). For bulk data use
        QMP pmemsave: m packets move about 2 KiB per round trip."""
        out = bytearray()
        for off in range(0, length, READ_CHUNK):
            n = min(READ_CHUNK, length - off)
            reply = self.command(f"m{address + off:x},{n:x}".encode())
            # An error is `Exx`; data is exactly 2n hex digits (and hex may itself start with 'e').
            if len(reply) != 2 * n:
                raise GdbError(f"memory read at {address + off:#x} failed: {reply[:20]!r}")
            out += bytes.fromhex(reply.decode())
        return bytes(out)

    # --- execution -------------------------------------------------------------------------------------
    def set_hw_break(self, address: int) -> None:
        self.ok(f"Z1,{address:x},4".encode())

    def remove_hw_break(self, address: int) -> None:
        self.ok(f"z1,{address:x},4".encode())

    def step(self, timeout: float | None = None, thread: int | None = None) -> Stop | None:
        """Execute one instruction (QEMU steps with interrupts and timers masked) and return its stop; with
        `thread`, that vCPU alone moves (the others stay stopped)."""
        self._send_raw(frame(b"s" if thread is None else f"vCont;s:{thread:x}".encode()))
        return self.wait_stop(budget("gdb_step") if timeout is None else timeout)

    def cont(self) -> None:
        """Resume; the stop reply is read later by wait_stop()."""
        self._send_raw(frame(b"c"))

    def wait_stop(self, timeout: float | None) -> Stop | None:
        """The next stop reply, or None when `timeout` seconds pass first (the VM keeps running)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            reply = self._read_packet(deadline)
            if reply is None:
                return None
            if reply[:1] in (b"T", b"S"):
                at = time.monotonic()
                found = re.search(rb"thread:(?:p[0-9a-f]+\.)?([0-9a-f]+);", reply)
                thread = int(found.group(1), 16) if found else None
                if thread is not None:
                    self.select(thread)
                regs = self.registers()
                return Stop(int(reply[1:3], 16), regs[15], regs, at, thread)
            if reply[:1] in (b"W", b"X"):
                raise GdbError(f"the VM ended while we waited for a breakpoint ({reply.decode()})")
            # O (console output) packets and the like: keep waiting

    def interrupt(self, timeout: float | None = None, thread: int | None = None) -> Stop | None:
        """Stop the VM; with `thread`, the returned stop holds that vCPU's registers (the stop reply of an
        interrupt may name another vCPU than the one the caller follows)."""
        self._send_raw(INTERRUPT)
        stop = self.wait_stop(budget("gdb_step") if timeout is None else timeout)
        if stop is None or thread is None or stop.thread in (None, thread):
            return stop
        self.select(thread)
        regs = self.registers()
        return Stop(stop.signal, regs[15], regs, stop.at, thread)

    def detach(self) -> None:
        """Resume the VM and let go of it."""
        with contextlib.suppress(GdbError, OSError):
            self.ok(b"D")
        self.close()
