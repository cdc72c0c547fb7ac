"""QEMU from a machine profile: command line, process lifetime, QMP, console.

QEMU starts paused (-S) with QMP, the serial console and (optionally) the gdbstub on unix sockets inside
the case directory, so parallel cases never race for ports. The process gets PR_SET_PDEATHSIG=SIGKILL and
its own session: it dies with the bench even when the bench is SIGKILLed, and `stop()` kills its group.
"""

import contextlib
import ctypes
import functools
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from qemu.qmp.legacy import QEMUMonitorProtocol

from ..deadlines import budget
from ..errors import BenchError, UserError
from ..machines import Machine
from .console import Console
from .share import qemu_share_args, share_kind

QEMU_BINARY = "qemu-system-arm"
MIN_QEMU_VERSION = (7, 0)
AUDIODEV_ID = "tbaudio"
# sun_path is 108 bytes; deeper case dirs get their socket dir through a short symlink in /tmp.
MAX_SOCKET_PATH = 100
PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class QemuSpec:
    machine: Machine
    ram: int
    kernel: Path | None  # None: no -kernel, nothing boots by itself (replay: `loaders` + the gdbstub)
    initrd: Path | None
    append: str
    dtb: Path | None
    share: Path | None
    # (file, address): raw images put in RAM by the generic loader device, for replaying a placement
    loaders: tuple[tuple[Path, int], ...] = ()
    # How `share` reaches the guest (emulator/share.py); None: the machine's first for the installed QEMU
    transport: str | None = None

    @property
    def share_transport(self) -> str:
        return self.transport or self.machine.transport(installed_qemu_version())


@dataclass(frozen=True)
class Sockets:
    qmp: Path
    console: Path
    gdb: Path


def qemu_binary() -> str:
    path = shutil.which(QEMU_BINARY)
    if path is None:
        raise UserError(
            f"{QEMU_BINARY} not found; install it with `apt-get install qemu-system-arm` (scripts/setup does)"
        )
    return path


def qemu_version(binary: str | None = None) -> tuple[int, int, int]:
    binary = binary or qemu_binary()
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, errors="replace", timeout=budget("qemu_probe")
        ).stdout
    except (OSError, subprocess.TimeoutExpired) as err:
        # A broken install (not executable, wrong architecture, hanging) is bad setup, not a bench bug.
        raise UserError(
            f"{binary} --version failed ({err}); reinstall it with `apt-get install --reinstall qemu-system-arm`"
        ) from None
    try:
        numbers = out.split("version", 1)[1].split()[0].split(".")
        major, minor, micro = (int("".join(ch for ch in n if ch.isdigit()) or 0) for n in (numbers + ["0"])[:3])
    except (IndexError, ValueError):
        raise UserError(f"cannot read the version of {QEMU_BINARY} from {out.strip()!r}") from None
    if (major, minor) < MIN_QEMU_VERSION:
        raise UserError(f"{QEMU_BINARY} {major}.{minor} is too old; need {MIN_QEMU_VERSION[0]}.{MIN_QEMU_VERSION[1]}+")
    return major, minor, micro


def qemu_args(spec: QemuSpec, sockets: Sockets | None, gdb: bool = False, incoming: Path | None = None) -> list[str]:
    """The full command line. Without sockets it is the hand-run form used by repro.sh (console on stdio).
    `incoming` restores a saved stage-1 state (snapshot.py) instead of booting."""
    m = spec.machine
    args = [QEMU_BINARY, *board_args(m), "-m", f"{spec.ram >> 20}M", *m.cpu_args, *m.qemu_args]
    # The console is the board's UART number `console_serial`: the ports before it get no backend.
    serial = ["-serial", "null"] * m.console_serial
    if spec.kernel is not None:
        args += ["-kernel", str(spec.kernel), "-append", spec.append]
        if spec.initrd is not None:
            args += ["-initrd", str(spec.initrd)]
    for path, address in spec.loaders:
        args += ["-device", f"loader,file={path},addr={address:#x},force-raw=on"]
    if spec.dtb is not None and spec.kernel is not None:
        args += ["-dtb", str(spec.dtb)]
    if spec.share is not None:
        args += qemu_share_args(spec.share_transport, spec.share)
    if sockets is None:
        # By hand: the console and QEMU's monitor (Ctrl-A c) on the terminal.
        return [*args, "-nographic", *serial, "-serial", "mon:stdio"]
    args += [
        "-display",
        "none",
        "-monitor",
        "none",
        "-S",
        "-qmp",
        f"unix:{sockets.qmp},server=on,wait=off",
        "-chardev",
        f"socket,id=tbcon,path={sockets.console},server=on,wait=off",
        *serial,
        "-serial",
        "chardev:tbcon",
    ]
    if gdb:
        args += ["-gdb", f"unix:{sockets.gdb},server=on,wait=off"]
    if incoming is not None:
        # QEMU 7.2 has no file: migration URI; exec: runs through /bin/sh, hence the quoting.
        args += ["-incoming", f"exec:cat {shlex.quote(str(incoming))}"]
    return args


def board_args(machine: Machine) -> list[str]:
    """-M with the machine's options, -cpu, and the silent audio backend a board with a codec needs. QEMU 7.2
    takes a lone -audiodev as the default (with a deprecation warning) and has no machine property for it;
    QEMU 10 requires `-M ...,audiodev=ID`: whether this QEMU has the property is asked of QEMU itself."""
    options = [machine.qemu_machine_arg]
    audio: list[str] = []
    if machine.needs_audiodev:
        audio = ["-audiodev", f"none,id={AUDIODEV_ID}"]
        if "audiodev" in _machine_properties(machine.qemu_machine):
            options.append(f"audiodev={AUDIODEV_ID}")
    return ["-M", ",".join(options), "-cpu", machine.cpu, *audio]


@functools.cache
def installed_qemu_version() -> tuple[int, int, int]:
    """The installed QEMU's version, asked once per process (a host without QEMU: the 7.2 form, for a
    repro.sh written there)."""
    if shutil.which(QEMU_BINARY) is None:
        return (7, 2, 0)
    return qemu_version()


@functools.cache
def _machine_properties(qemu_machine: str) -> frozenset[str]:
    binary = shutil.which(QEMU_BINARY)
    if binary is None:  # a command line for repro.sh on a machine without QEMU: the 7.2 form
        return frozenset()
    try:
        out = subprocess.run(
            [binary, "-M", f"{qemu_machine},help"],
            capture_output=True,
            text=True,
            errors="replace",
            timeout=budget("qemu_probe"),
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return frozenset()
    return frozenset(line.split("=", 1)[0].strip() for line in out.splitlines() if line.startswith("  "))


def _socket_dir(case_dir: Path) -> tuple[Path, Path | None]:
    real = case_dir / "sock"
    real.mkdir(parents=True, exist_ok=True)
    if len(str(real / "console.sock")) <= MAX_SOCKET_PATH:
        return real, None
    link = Path(tempfile.mkdtemp(prefix="tb-")) / "s"
    link.symlink_to(real.resolve())
    return link, link.parent


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class QemuProcess:
    """A running QEMU. Use as a context manager: leaving the block always kills QEMU."""

    def __init__(
        self,
        spec: QemuSpec,
        case_dir: Path,
        gdb: bool = False,
        debugger_attached: bool = False,
        incoming: Path | None = None,
    ):
        self.spec = spec
        self.case_dir = case_dir
        self.gdb = gdb
        self.debugger_attached = debugger_attached
        self.proc: subprocess.Popen[bytes] | None = None
        self.qmp: QEMUMonitorProtocol | None = None
        self.console: Console | None = None
        self._link_dir: Path | None = None
        sock_dir, self._link_dir = _socket_dir(case_dir)
        self.sockets = Sockets(sock_dir / "qmp.sock", sock_dir / "console.sock", sock_dir / "gdb.sock")
        self.incoming = incoming
        self.args = qemu_args(spec, self.sockets, gdb, incoming)

    def __enter__(self) -> "QemuProcess":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self.args[0] = qemu_binary()
        (self.case_dir / "qemu.cmdline").write_text(shlex.join(self.args) + "\n")
        env = dict(os.environ) | dict(self.spec.machine.env)
        stderr = (self.case_dir / "qemu.stderr").open("wb")
        self.proc = subprocess.Popen(
            self.args,
            stdin=subprocess.DEVNULL,
            stdout=stderr,
            stderr=stderr,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        stderr.close()
        deadline = time.monotonic() + budget("qemu_start")
        while not (self.sockets.qmp.exists() and self.sockets.console.exists()):
            if self.proc.poll() is not None:
                raise BenchError(f"QEMU exited at start (code {self.proc.returncode}): {self.stderr_tail()}")
            if time.monotonic() > deadline:
                raise BenchError(f"QEMU did not create its sockets within {budget('qemu_start'):.0f}s")
            time.sleep(0.02)
        err = self._connect_qmp()
        if err is not None and self.proc.poll() is None:
            # Alive, so not a failed start: a greeting QEMU garbled once under load (seen in CI while a
            # snapshot was restoring). QMP takes a new client after the first hangs up: one more try.
            err = self._connect_qmp()
        if err is not None:  # QEMU died while starting (a bad -device, overlapping ROMs): say why
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
                raise BenchError(f"QEMU's QMP did not answer twice ({err}): QEMU stopped")
            raise BenchError(f"QEMU exited at start ({type(err).__name__}): {self.stderr_tail()}")
        # Without a writable share the guest sends its files back over the console (share.py), into the share.
        back = None if self.spec.share is None or share_kind(self.spec.share_transport).writable else self.spec.share
        self.console = Console(
            self.sockets.console,
            self.case_dir / "console.log",
            self.debugger_attached,
            back,
            self.spec.machine.halt_lines,
            self._halted,
        )

    def _connect_qmp(self) -> Exception | None:
        if self.qmp is not None:
            with contextlib.suppress(Exception):
                self.qmp.close()
        self.qmp = QEMUMonitorProtocol(str(self.sockets.qmp))
        try:
            self.qmp.connect()
        except Exception as err:  # the library's errors have no common base worth naming
            return err
        return None

    def _halted(self) -> None:
        """The guest halted for good on a board QEMU keeps running then (console reader thread): end QEMU."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)

    def stderr_tail(self) -> str:
        path = self.case_dir / "qemu.stderr"
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-5:]) if path.exists() else ""

    def cont(self) -> None:
        assert self.qmp is not None
        self.qmp.cmd("cont")

    def pmemsave(self, address: int, size: int, path: Path) -> None:
        assert self.qmp is not None
        self.qmp.cmd("pmemsave", val=address, size=size, filename=str(path))

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.qmp is not None:
            # QEMU may already be gone (poweroff, panic with -no-reboot); it is killed below in any case.
            with contextlib.suppress(Exception):
                if self.running():
                    self.qmp.cmd("quit")
            with contextlib.suppress(Exception):
                self.qmp.close()
            self.qmp = None
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=3)
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.console is not None:
            self.console.close()
            self.console = None
        for path in (self.sockets.qmp, self.sockets.console, self.sockets.gdb):
            path.unlink(missing_ok=True)
        if self._link_dir is not None:
            shutil.rmtree(self._link_dir, ignore_errors=True)
        sock_dir = self.case_dir / "sock"
        if sock_dir.is_dir() and not any(sock_dir.iterdir()):
            sock_dir.rmdir()
