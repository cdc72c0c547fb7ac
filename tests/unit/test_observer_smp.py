"""The Observer with several vCPUs, against test_observer's fake gdbstub grown into QEMU's -smp behaviour:
every vCPU is a thread, a stop reply names the one that stopped (`T05thread:03;`), `g`/`p` read the
thread chosen with `Hg`, and an interrupt may be reported on another thread than the one that runs. Here
vCPU 3 runs kexec -e (the reboot CPU need not be the first) while 1 and 2 sit parked in a `b .` with
interrupts masked: read from the wrong vCPU, the kernel-entry wait would take them for a halted
decompressor."""

from __future__ import annotations

import json
from pathlib import Path

from test_observer import (  # noqa: F401  (quick_samples and sock_dir are fixtures)
    B_SELF,
    BASE,
    DECOMPRESSOR,
    ZIMAGE,
    FakeGdbStub,
    _inverted,
    _observe,
    _plan,
    _stub,
    quick_samples,
    sock_dir,
)

PARKED_PC = BASE + 0x9F000  # where the offline vCPUs sit: a `b .` ...
PARKED_CPSR = 0x600001D3  # ... with IRQ and FIQ masked


class SmpStub(FakeGdbStub):
    def __init__(self, *args, threads: int = 3, boot: int = 3, **kwargs):
        self.count, self.boot, self.selected = threads, boot, 1  # QEMU's g_cpu starts at the first vCPU
        super().__init__(*args, **kwargs)

    def _send(self, payload: bytes) -> None:
        if payload[:1] == b"T":  # a stop: the running vCPU stopped, and QEMU reports it
            reported = self.boot if payload != b"T02" else 1  # an interrupt: reported on vCPU 1
            payload += b"thread:%02x;" % reported
            self.selected = reported
        super()._send(payload)

    def _handle(self, p: bytes) -> bytes | None:
        text = p.decode()
        if text.startswith("Hg"):
            self.selected = int(text[2:], 16)
            return b"OK"
        if text == "qfThreadInfo":
            return b"m" + ",".join(f"{t:02x}" for t in range(1, self.count + 1)).encode()
        if text == "qsThreadInfo":
            return b"l"
        if text == f"vCont;s:{self.boot:x}":
            return super()._handle(b"s")
        if self.selected != self.boot and text == "g":
            return b"".join((PARKED_PC if n == 15 else n).to_bytes(4, "little").hex().encode() for n in range(16))
        if self.selected != self.boot and text.startswith("p"):
            return PARKED_CPSR.to_bytes(4, "little").hex().encode()
        return super()._handle(p)


def _smp_stub(where: Path, plan, trace, step_delay: float = 0.0) -> SmpStub:
    stub = _stub(where, plan, trace, {}, step_delay)  # loads the segments; then swap in the SMP class
    stub.close()
    (where / "gdb.sock").unlink()
    smp = SmpStub(where / "gdb.sock", trace, {}, {2: plan.dtb}, step_delay)
    smp.mem[:] = stub.mem
    smp.load(PARKED_PC, B_SELF)
    return smp


def test_the_stops_steps_and_samples_are_on_the_vcpu_that_entered_the_zimage(sock_dir, tmp_path):  # noqa: F811
    # TEXT_OFFSET 0x8000 (one address for both stops, so a step-off) and a slow decompressor (samples).
    plan = _plan(tmp_path, kernel_entry=ZIMAGE)
    slow = [BASE + 0x50000 + 4 * i for i in range(15)]
    trace = [BASE + 0x90000, ZIMAGE, ZIMAGE + 4, *slow, ZIMAGE, ZIMAGE + 4]
    stub = _smp_stub(sock_dir, plan, trace, step_delay=0.02)
    stub.writes = {5: _inverted(stub, plan.segments[1].start, 0x40)}
    try:
        got = _observe(stub, sock_dir, plan, tmp_path / "observe")
    finally:
        stub.close()
    assert got.phase == "kernel", got.hang
    # Both stops read vCPU 3's registers: PC and r2 are the boot CPU's, not a parked CPU's.
    assert [(s.name, s.pc, s.r2, s.problems) for s in got.stops] == [
        ("zimage", ZIMAGE, plan.dtb, ()),
        ("kernel", ZIMAGE, plan.dtb, ()),
    ]
    assert b"vCont;s:3" in stub.packets and b"s" not in stub.packets  # the step moves vCPU 3 alone
    assert stub.interrupts >= 2  # samples of the kernel-entry wait, each read from vCPU 3 again
    record = json.loads((tmp_path / "observe" / "cpus.json").read_text())
    assert record["zimage_entry"] == 3 and record["kernel_entry"] == 3 and record["vcpus"] == [1, 2, 3]
    assert record["others_at_zimage_entry"] == {
        "1": {"pc": f"{PARKED_PC:#x}", "cpsr": f"{PARKED_CPSR:#x}"},
        "2": {"pc": f"{PARKED_PC:#x}", "cpsr": f"{PARKED_CPSR:#x}"},
    }


def test_a_one_vcpu_stub_that_names_no_thread_still_works(sock_dir, tmp_path):  # noqa: F811
    plan = _plan(tmp_path, kernel_entry=BASE + 0x40000)
    stub = _stub(sock_dir, plan, [BASE + 0x90000, ZIMAGE, *DECOMPRESSOR, BASE + 0x40000, BASE + 0x40004], {})
    try:
        got = _observe(stub, sock_dir, plan, tmp_path / "observe")
    finally:
        stub.close()
    assert got.phase == "kernel"
    assert not any(p.startswith(b"Hg") for p in stub.packets)
    assert json.loads((tmp_path / "observe" / "cpus.json").read_text()) == {"zimage_entry": None, "kernel_entry": None}
