"""observe.observer.Observer against a fake gdbstub: a unix-socket server speaking the part of the gdb remote
protocol the Observer uses (qSupported, QStartNoAckMode, qXfer target.xml, g, p, m, M, Z1/z1, s, c, ^C, D),
driving a pretend CPU that walks a scripted list of PCs and writes RAM at chosen steps.

Like QEMU (gdbstub.py's notes, DOMAIN 8.4), continuing from an address that holds a hardware breakpoint stops
again at once without executing anything; that is why a TEXT_OFFSET 0x8000 kernel, entered where the zImage
was, needs the step-off. Addresses and the expected ranges are chosen here by hand."""

from __future__ import annotations

import random
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbench.emulator.console import timeout_factor
from testbench.emulator.gdbstub import frame, parse_packet
from testbench.observe import observer as observer_module
from testbench.observe.observation import Clobber
from testbench.observe.observer import Observer
from testbench.observe.plan import Plan, SegmentSpec

BASE, RAM = 0x40000000, 0x100000
ZIMAGE = BASE + 0x8000  # kexec's entry: the zImage segment
ZIMAGE_SIZE = 0x4000
INITRD, INITRD_SIZE = BASE + 0x20000, 0x2000
DTB = BASE + 0x30000  # r2 at both stops (no DTB segment: its check reads the blob with fdtget)
WINDOW = (BASE + 0xC000, BASE + 0x1C000)  # the pattern window: free RAM above the zImage segment
CPSR_SVC_MASKED = 0x600001D3  # SVC mode, IRQ and FIQ masked: what the decompressor runs with
SCTLR_MMU_OFF = 0x00C50078  # bit 0 (M) clear
B_SELF = bytes.fromhex("feffffea")  # `b .` in ARM state
TARGET_XML = (
    '<?xml version="1.0"?><target><architecture>arm</architecture><feature name="org.gnu.gdb.arm.core">'
    + "".join(f'<reg name="r{i}" bitsize="32"/>' for i in range(13))
    + '<reg name="sp" bitsize="32"/><reg name="lr" bitsize="32"/><reg name="pc" bitsize="32"/>'
    '<reg name="cpsr" bitsize="32" regnum="25"/></feature><feature name="org.qemu.gdb.arm.sys.regs">'
    '<reg name="SCTLR" bitsize="32" regnum="26"/></feature></target>'
)


class FakeGdbStub:
    """QEMU's gdbstub on a unix socket, with a CPU that walks `trace` (PCs in execution order; trace[0] is
    where it is at attach). `writes[i]` is written to RAM when the CPU gets to trace[i]. Past the end of the
    trace the CPU spins where it is until interrupted."""

    def __init__(
        self,
        path: Path,
        trace: list[int],
        writes: dict[int, tuple[int, bytes]],
        regs: dict[int, int],
        step_delay: float = 0.0,
    ):
        self.mem = bytearray(RAM)
        self.trace, self.writes, self.step_delay = trace, writes, step_delay
        self.i = 0
        self.regs = [regs.get(n, 0) for n in range(16)]
        self.breakpoints: set[int] = set()
        self.running = False
        self.closed = False
        self.packets: list[bytes] = []  # every packet received, in order
        self.interrupts = 0  # ^C received while the CPU ran
        self.cond = threading.Condition()
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(path))
        self._server.listen(1)
        self._peer: socket.socket | None = None
        self._threads = [
            threading.Thread(target=self._serve, daemon=True),
            threading.Thread(target=self._cpu, daemon=True),
        ]
        for t in self._threads:
            t.start()

    # --- RAM, as kexec left it and as QMP pmemsave reads it ---------------------------------------------
    def load(self, address: int, data: bytes) -> None:
        self.mem[address - BASE : address - BASE + len(data)] = data

    def read(self, address: int, size: int) -> bytes:
        with self.cond:  # re-entrant: the protocol thread reads with it held
            if address >= BASE and address + size <= BASE + RAM:
                return bytes(self.mem[address - BASE : address - BASE + size])
            return bytes(size)

    def pmemsave(self, address: int, size: int, path: Path) -> None:
        path.write_bytes(self.read(address, size))

    @property
    def pc(self) -> int:
        return self.trace[self.i]

    # --- the CPU ------------------------------------------------------------------------------------------
    def _advance(self) -> None:
        self.i += 1
        if self.i in self.writes:
            address, data = self.writes[self.i]
            self.load(address, data)

    def _cpu(self) -> None:
        while True:
            with self.cond:
                while not self.running and not self.closed:
                    self.cond.wait()
                if self.closed:
                    return
            time.sleep(self.step_delay or 0.001)
            with self.cond:
                if not self.running or self.i + 1 >= len(self.trace):
                    continue  # interrupted meanwhile, or spinning at the end of the trace
                self._advance()
                if self.pc in self.breakpoints:
                    self.running = False
                    self._send(b"T05")

    # --- the protocol -------------------------------------------------------------------------------------
    def _send(self, payload: bytes) -> None:
        assert self._peer is not None
        self._peer.sendall(frame(payload))

    def _serve(self) -> None:
        try:
            self._peer, _ = self._server.accept()
        except OSError:
            return
        buf = b""
        while True:
            try:
                data = self._peer.recv(65536)
            except OSError:
                return
            if not data:
                return
            buf += data
            while buf:
                if buf[:1] == b"\x03":
                    buf = buf[1:]
                    self._interrupt()
                    continue
                if buf[:1] in (b"+", b"-"):
                    buf = buf[1:]
                    continue
                payload, rest = parse_packet(buf)
                if payload is None:
                    break
                buf = rest
                with self.cond:
                    self.packets.append(payload)
                    reply = self._handle(payload)
                    if reply is not None:
                        self._send(reply)

    def _interrupt(self) -> None:
        with self.cond:
            if self.running:  # a ^C that crosses a breakpoint's stop reply is ignored, as a stopped VM does
                self.interrupts += 1
                self.running = False
                self._send(b"T02")

    def _register(self, number: int) -> int:
        if number == 15:
            return self.pc
        if number < 15:
            return self.regs[number]
        return {25: CPSR_SVC_MASKED, 26: SCTLR_MMU_OFF}[number]

    def _handle(self, p: bytes) -> bytes | None:  # called with self.cond held
        text = p.decode()
        if text.startswith("qSupported"):
            return b"PacketSize=1000;qXfer:features:read+"
        if text == "QStartNoAckMode":
            return b"OK"
        if text.startswith("qXfer:features:read:target.xml:"):
            return b"l" + TARGET_XML.encode()
        if text == "g":
            return b"".join(self._register(n).to_bytes(4, "little").hex().encode() for n in range(16))
        if text.startswith("p"):
            return self._register(int(text[1:], 16)).to_bytes(4, "little").hex().encode()
        if text.startswith("m"):
            address, size = (int(x, 16) for x in text[1:].split(","))
            return self.read(address, size).hex().encode()
        if text.startswith("M"):
            where, data = text[1:].split(":")
            self.load(int(where.split(",")[0], 16), bytes.fromhex(data))
            return b"OK"
        if text[:3] in ("Z1,", "z1,"):
            address = int(text.split(",")[1], 16)
            (self.breakpoints.add if text[0] == "Z" else self.breakpoints.discard)(address)
            return b"OK"
        if text == "s":
            if self.i + 1 < len(self.trace):
                self._advance()
            return b"T05"
        if text == "c":
            if self.pc in self.breakpoints:
                return b"T05"  # continuing from a breakpoint's own address: stopped again at once
            self.running = True
            self.cond.notify_all()
            return None
        if text == "D":
            self.running = True
            self.cond.notify_all()
            return b"OK"
        return b""  # unsupported

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.running = False
            self.cond.notify_all()
        if self._peer is not None:
            self._peer.close()
        self._server.close()


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="tbgdb") as d:  # short: a unix socket path has ~107 bytes
        yield Path(d)


@pytest.fixture(autouse=True)
def quick_samples(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(observer_module, "SPIN_SAMPLE", 0.05)


def _files(tmp_path: Path) -> tuple[Path, Path]:
    rng = random.Random(5)
    zimage = bytearray(rng.randbytes(ZIMAGE_SIZE))
    zimage[0x100:0x104] = B_SELF  # the decompressor's halt loop, at zImage offset 0x100
    (tmp_path / "zImage").write_bytes(bytes(zimage))
    (tmp_path / "initrd.img").write_bytes(rng.randbytes(INITRD_SIZE))
    return tmp_path / "zImage", tmp_path / "initrd.img"


def _plan(tmp_path: Path, kernel_entry: int) -> Plan:
    kernel, initrd = _files(tmp_path)
    return Plan(
        entry=ZIMAGE,
        kernel_entry=kernel_entry,
        text_offset=kernel_entry - BASE,
        dtb=DTB,
        segments=(
            SegmentSpec("kernel", ZIMAGE, ZIMAGE_SIZE, kernel),
            SegmentSpec("initrd", INITRD, INITRD_SIZE, initrd),
        ),
        fill=WINDOW,
        regions=(("kernel", kernel_entry, kernel_entry + 0x40000),),
        ram=(BASE, BASE + RAM),
    )


def _stub(
    sock_dir: Path,
    plan: Plan,
    trace: list[int],
    writes: dict[int, tuple[int, bytes]],
    step_delay: float = 0.0,
    regs: dict[int, int] | None = None,
) -> FakeGdbStub:
    stub = FakeGdbStub(sock_dir / "gdb.sock", trace, writes, {2: DTB} | (regs or {}), step_delay)
    for seg in plan.segments:  # what kexec -l put there
        assert seg.source is not None
        stub.load(seg.start, seg.source.read_bytes())
    return stub


def _inverted(stub: FakeGdbStub, address: int, size: int) -> tuple[int, bytes]:
    """A write that surely changes every byte of [address, address + size)."""
    return address, bytes(b ^ 0xFF for b in stub.read(address, size))


def _observe(stub: FakeGdbStub, sock_dir: Path, plan: Plan, out: Path):
    observer = Observer(sock_dir / "gdb.sock", stub.pmemsave, plan, out, {"handoff": 3.0, "decompress": 3.0})
    try:
        observer.arm()  # breakpoints set, the CPU runs on to kexec -e
        return observer.observe(time.monotonic())
    finally:
        observer.close()


DECOMPRESSOR = [BASE + 0x50000 + 4 * i for i in range(6)]  # the relocated decompressor copy's code


def test_text_offset_0x8000_steps_off_the_zimage_entry_and_rearms_the_same_breakpoint(sock_dir, tmp_path):
    # Kernel entry == zImage entry (RAM base + 0x8000). The CPU: stage 1 -> zImage entry (stop 1) -> one
    # step -> decompressor (clobbers the initrd, writes the window, overwrites the zImage) -> zImage entry
    # again (stop 2, the kernel) -> kernel code.
    plan = _plan(tmp_path, kernel_entry=ZIMAGE)
    trace = [BASE + 0x90000, BASE + 0x90004, ZIMAGE, ZIMAGE + 4, *DECOMPRESSOR, ZIMAGE, ZIMAGE + 4, ZIMAGE + 8]
    stub = _stub(sock_dir, plan, trace, {})
    stub.writes = {
        5: _inverted(stub, INITRD + 0x100, 0x80),
        6: (BASE + 0x12000, b"\x11" * 16),
        7: _inverted(stub, ZIMAGE, 0x40),
    }
    try:
        got = _observe(stub, sock_dir, plan, tmp_path / "observe")
    finally:
        stub.close()
    assert got.phase == "kernel", got.hang
    assert [(s.name, s.reached, s.pc, s.r2, s.mmu_off, s.problems) for s in got.stops] == [
        ("zimage", True, ZIMAGE, DTB, True, ()),
        ("kernel", True, ZIMAGE, DTB, True, ()),
    ]
    # Stop 2 came after the decompressor ran, not at once where stop 1 was.
    assert got.clobbered == (Clobber("initrd", INITRD + 0x100, INITRD + 0x180, 0x100, 0x180),)
    assert got.by_design == (Clobber("kernel", ZIMAGE, ZIMAGE + 0x40, 0, 0x40),)
    assert got.fidelity == ()
    assert got.footprint is not None and got.footprint.highest_written_end == INITRD + 0x180
    # The protocol: remove the breakpoint, step off the address, set the same breakpoint again, continue.
    bp = f"{ZIMAGE:x},4".encode()
    sent = stub.packets
    off = sent.index(b"z1," + bp)
    assert sent[off : off + 3] == [b"z1," + bp, b"s", b"g"]  # the step's stop reply reads the registers
    assert sent[off + 3 : off + 5] == [b"Z1," + bp, b"c"]
    assert sent[-1] == b"D"


def test_the_kernel_entry_wait_samples_the_pc_and_resumes_until_the_breakpoint(sock_dir, tmp_path):
    # TEXT_OFFSET 0x208000: two breakpoints. The decompressor runs ~0.5 s (25 steps of 20 ms): the wait
    # interrupts it every SPIN_SAMPLE (50 ms here), finds no halt loop, and lets it go on each time.
    kernel_entry = BASE + 0x40000
    plan = _plan(tmp_path, kernel_entry=kernel_entry)
    slow = [BASE + 0x50000 + 4 * i for i in range(25)]
    trace = [BASE + 0x90000, ZIMAGE, *slow, kernel_entry, kernel_entry + 4]
    stub = _stub(sock_dir, plan, trace, {}, step_delay=0.02)
    stub.writes = {10: _inverted(stub, INITRD, 0x20)}
    try:
        got = _observe(stub, sock_dir, plan, tmp_path / "observe")
    finally:
        stub.close()
    assert got.phase == "kernel", got.hang
    assert [(s.name, s.reached, s.pc) for s in got.stops] == [("zimage", True, ZIMAGE), ("kernel", True, kernel_entry)]
    assert got.clobbered == (Clobber("initrd", INITRD, INITRD + 0x20, 0, 0x20),)
    assert stub.interrupts >= 3, stub.interrupts
    # Only the zImage breakpoint is removed at stop 1: no step-off when the two entries differ.
    assert b"s" not in stub.packets
    assert stub.packets.count(f"z1,{kernel_entry:x},4".encode()) == 1  # removed once, after stop 2


def test_a_halt_loop_with_interrupts_masked_ends_the_kernel_entry_wait_at_once(sock_dir, tmp_path):
    # The decompressor's error(): it prints its message (r0 left just past it) and spins in `b .` with IRQ
    # and FIQ masked, here at zImage offset 0x100. The deadline is 3 s; the halt check ends the wait sooner.
    kernel_entry = BASE + 0x40000
    plan = _plan(tmp_path, kernel_entry=kernel_entry)
    message = b"XZ-compressed data is corrupt\0"
    at = WINDOW[0] + 0x402  # after the pattern's 5a a5: the byte before the message is not printable
    trace = [BASE + 0x90000, ZIMAGE, *DECOMPRESSOR, ZIMAGE + 0x100]
    stub = _stub(sock_dir, plan, trace, {2: (at, message)}, regs={0: at + len(message)})
    try:
        got = _observe(stub, sock_dir, plan, tmp_path / "observe")
    finally:
        stub.close()
    assert got.phase == "decompress"
    assert got.hang is not None
    assert (got.hang.found_by, got.hang.pc, got.hang.insn, got.hang.halted_for_good) == (
        "halt check",
        ZIMAGE + 0x100,
        "eafffffe",
        True,
    )
    assert got.hang.waited < 1.5 * timeout_factor(), got.hang.waited  # the deadline is 3 s
    assert got.hang.zimage_offset == 0x100
    assert got.hang.strings["r0"] == {"past": "XZ-compressed data is corrupt"}
    assert got.hang.reasons[0].startswith(
        f"the kernel entry {kernel_entry:#x} never came within the decompress deadline ({3.0 * timeout_factor():.0f} s)"
    )
    assert "spins in a branch-to-self" in got.hang.reasons[0]
    assert [(s.name, s.reached) for s in got.stops] == [("zimage", True), ("kernel", False)]
    assert (tmp_path / "observe" / "hung-decompress-ram.bin").is_file()
