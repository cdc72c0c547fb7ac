"""One test case, end to end: stage-1 boot, kexec -l, kexec -e, stage 2, verdict, artifacts.

`prepare_case()` checks every input and writes nothing outside the case dir; `run_case()` drives QEMU and
always returns a CaseResult (a bench failure becomes verdict `error`), with QEMU dead by the time it returns.
"""

import json
import os
import re
import shlex
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from . import kexeclog
from .console import ConsoleClosed, ConsoleTimeout, timeout_factor
from .errors import BenchError, UserError
from .guest import Shell
from .images import Images
from .initramfs import cached_stage2_initrd, stage1_initramfs
from .inputs import Input, Loader, check_dtb, check_kexec, describe, existing_file, loader_bundle
from .machines import Machine
from .memmap import PLAIN, dump_qemu_dtb, get_memmap, stage1_dtb
from .observe import Observer, kernel_log_lines, make_plan
from .oracle import analyze
from .qemu import SHARE_TAG, QemuProcess, QemuSpec, qemu_binary, qemu_version
from .report.artifacts import write_case_artifacts
from .snapshot import Slot, SnapshotBroken, claim, wait_restored
from .verdict import STAGE2_MARKER, Verdict, compare_oracle, judge_observation, judge_stage2, parse_stage2
from .zimage import ZImage, read_zimage

GUEST_SHARE = "/mnt"
TAIL_IN_REASONS = 15  # console lines quoted in a hang's reasons (console.log has them all)
KERNEL_LOG_SPAN = 32 << 20  # RAM above the kernel entry searched for log lines after a silent hang
# Per-phase deadlines in seconds, before TESTBENCH_TIMEOUT_FACTOR. Measured on 2 TCG cores: stage 1 boots
# in ~5 s, kexec -l of a 32 MB initrd over 9p takes ~4 s (100 MB took 48 s with the host fully loaded, hence
# 0.8 s/MiB), a stage-2 boot ~7 s plus ~0.1 s per MiB of payload.
# From "Bye!" to the new kernel's first earlycon line takes ~3 s (handoff + XZ decompression), so 15 s of
# silence there is a hang (15 s leaves room for a loaded host). When the observer saw the kernel entry,
# handoff and decompression are behind us and earlycon speaks within ~0.5 s: 6 s of silence is a hang.
TIMEOUTS = {"boot1": 90.0, "command": 30.0, "load_base": 30.0, "load_per_mib": 0.8,
            "stage2_base": 90.0, "stage2_per_mib": 0.6, "silence": 15.0, "silence_after_entry": 6.0}
UNTIL = ("init", "kernel-entry")
LAYOUT_ONLY = "layout only (--until kernel-entry): judged at the kernel entry, stage 2 not booted"
# Beyond the kernel and the initrd, a case dir holds the loader bundle (~6 MiB), logs and dumps.
OUT_DIR_SLACK = 32 << 20


@dataclass(frozen=True)
class CaseRequest:
    machine: Machine
    ram: int
    out: Path
    kernel: Path | None = None  # None: Debian's kernel from the image cache
    initrd: Path | None = None  # None: a generated stage-2 initrd with a payload of initrd_size bytes
    initrd_size: int = 1 << 20
    seed: int = 1
    dtb: Path | None = None  # None: the DTB the first kernel booted with (/sys/firmware/fdt)
    kexec: Path | None = None  # None: Debian's kexec-tools
    kexec_args: tuple[str, ...] = ()
    gdb: bool = False  # a user's debugger will attach: no deadlines
    observe: bool = False  # stop at zImage and kernel entry via the gdbstub, dump and diff every segment
    snapshot: bool = True  # restore stage 1 from its saved state (snapshot.py) instead of booting it
    until: str = "init"  # "kernel-entry": a layout verdict from the ground truth alone, no stage-2 boot
    memmap: str = PLAIN  # a RAM map from images/memmaps.toml: holes stage 1's DTB gives kexec to work around

    @property
    def observing(self) -> bool:
        return self.observe or self.until == "kernel-entry"

    @property
    def stage2_cmdline(self) -> str:
        return " ".join([f"console={self.machine.console}", *self.machine.stage2_cmdline, "panic=-1"])


@dataclass(frozen=True)
class PreparedCase:
    request: CaseRequest
    share: Path
    stage1: QemuSpec
    zimage: ZImage
    loader: Loader
    inputs: dict[str, Input]
    payload_sha256: str | None
    kexec_command: str
    image_set: dict  # Images.provenance(): the Debian suite, its lock and any drift from it


@dataclass(frozen=True)
class CaseResult:
    request: CaseRequest
    verdict: Verdict
    timings: dict[str, float]
    inputs: dict[str, Input] = field(default_factory=dict)
    load: dict | None = None
    predicted: dict | None = None
    stage2: dict | None = None
    kexec_rc: int | None = None
    loader_version: str | None = None
    qemu_version: str | None = None
    observed: dict | None = None  # observe.Observation.to_dict(), with --observe
    oracle: dict | None = None  # verdict.compare_oracle(): does the oracle agree with the emulator?
    stage1: dict | None = None  # how stage 1 came up: booted, booted and saved, or restored (+ snapshot key)
    image_set: dict | None = None  # where the Debian inputs came from (suite, lock, drift)

    def to_dict(self) -> dict:
        m = self.request.machine
        truth = {} if self.observed is None else {
            "observed": self.observed,
            "oracle_agrees": self.oracle["agrees"] if self.oracle else None,
            "oracle_difference": self.oracle["differences"] if self.oracle else None,
        }
        return {
            **self.verdict.to_dict(),
            "machine": m.name,
            "ram": {"base": m.ram_base, "size": self.request.ram},
            "kexec_args": list(self.request.kexec_args),
            "load": self.load,
            "predicted": self.predicted,
            "stage2": self.stage2,
            "inputs": {**({"debian": self.image_set} if self.image_set else {}),
                       **{role: i.to_dict() for role, i in self.inputs.items()}},
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "kexec_rc": self.kexec_rc,
            "loader_version": self.loader_version,
            "qemu_version": self.qemu_version,
            "stage1": self.stage1,
            "until": self.request.until,
            **truth,
        }


def _link_or_copy(source: Path, target: Path) -> None:
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def prepare_case(request: CaseRequest, images: Images) -> PreparedCase:
    m = request.machine
    m.check_ram(request.ram)
    memmap = get_memmap(request.memmap)
    memmap.check(m, request.ram)
    if request.observing and request.gdb:
        raise UserError("--observe/--until kernel-entry and --gdb all need QEMU's gdbstub; it takes one client")
    if request.until not in UNTIL:
        raise UserError(f"--until {request.until}: choose one of {', '.join(UNTIL)}")
    kernel = existing_file(request.kernel or images.zimage, "kernel")
    zimage = read_zimage(kernel)
    loader = check_kexec(request.kexec) if request.kexec else Loader(images.kexec, True, None)
    if request.initrd is not None:
        initrd_bytes = existing_file(request.initrd, "initrd").stat().st_size
    else:
        initrd_bytes = request.initrd_size
    if initrd_bytes >= request.ram:
        raise UserError(f"initrd of {initrd_bytes} bytes does not fit in {request.ram >> 20} MiB of RAM")
    dtb = check_dtb(request.dtb) if request.dtb else None

    out = request.out
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise UserError(f"output dir {out}: cannot write ({err.strerror})") from None
    # The share may be copied rather than hard-linked (another filesystem): refuse a dir that cannot hold
    # it, so a full disk is one clear line here and not ENOSPC halfway through the run.
    kernel_bytes = kernel.stat().st_size
    need = kernel_bytes + initrd_bytes + OUT_DIR_SLACK
    if request.observing:  # both stops are dumped in full before the dumps that repeat a file are dropped
        need += 2 * (kernel_bytes + initrd_bytes)
    free = shutil.disk_usage(out).free
    if free < need:
        raise UserError(f"output dir {out}: only {free >> 10} KiB free, a case needs about {need >> 20} MiB")
    share = out / "share"
    shutil.rmtree(share, ignore_errors=True)
    (share / "loader").mkdir(parents=True)
    _link_or_copy(kernel, share / "zImage")
    inputs = {"kernel": describe("kernel", kernel, _version_of(images, kernel, images.kernel_package))}
    payload_sha = None
    if request.initrd is not None:
        _link_or_copy(request.initrd, share / "initrd.img")
        inputs["initrd"] = describe("initrd", request.initrd)
    else:
        built = cached_stage2_initrd(images, request.initrd_size, request.seed)
        _link_or_copy(built.path, share / "initrd.img")
        payload_sha = built.payload_sha256
        inputs["initrd"] = replace(describe("initrd", share / "initrd.img"),
                                   version=f"stage2 payload {built.payload_size} bytes, seed {built.seed}")
    if dtb is not None:
        _link_or_copy(dtb, share / "board.dtb")
        inputs["dtb"] = describe("dtb", dtb)
    bundle = loader_bundle(images)
    for lib in (bundle / "lib").iterdir():
        (share / "loader" / "lib").mkdir(exist_ok=True)
        _link_or_copy(lib, share / "loader" / "lib" / lib.name)
    _link_or_copy(loader.binary, share / "loader" / "kexec")
    kexec_version = images.package("kexec-tools").version if request.kexec is None else _built_version(loader.binary)
    inputs["kexec"] = describe("kexec", loader.binary, kexec_version)

    stage1_initrd = stage1_initramfs(images)
    board_dtb = None if m.qemu_generates_dtb else images.dtb_dir / m.dtb
    if board_dtb is not None and not board_dtb.exists():
        raise BenchError(f"{m.name}: DTB {board_dtb.name} is not in the kernel package")
    if memmap.no_map:
        board = board_dtb.read_bytes() if board_dtb else dump_qemu_dtb(qemu_binary(), m, request.ram)
        board_dtb = stage1_dtb(images.root, board, memmap, m.ram_base)
        inputs["stage1_dtb"] = replace(describe("stage1_dtb", board_dtb), version=f"memory map {memmap.name}")
    stage1 = QemuSpec(machine=m, ram=request.ram, kernel=images.zimage, initrd=stage1_initrd,
                      append=" ".join([f"console={m.console}", *m.stage1_cmdline]), dtb=board_dtb, share=share)
    inputs["stage1_kernel"] = describe("stage1_kernel", images.zimage, images.package(images.kernel_package).version)
    run_kexec = f"{GUEST_SHARE}/loader/kexec"
    if loader.dynamic:
        lib = f"{GUEST_SHARE}/loader/lib"
        run_kexec = f"{lib}/ld-linux-armhf.so.3 --library-path {lib} {run_kexec}"
    load_args = ["--debug", "-l", f"{GUEST_SHARE}/zImage", f"--initrd={GUEST_SHARE}/initrd.img",
                 f"--dtb={GUEST_SHARE}/board.dtb", f"--command-line={request.stage2_cmdline}",
                 *request.kexec_args]
    return PreparedCase(request=request, share=share, stage1=stage1, zimage=zimage, loader=loader, inputs=inputs,
                        image_set=images.provenance(),
                        payload_sha256=payload_sha, kexec_command=f"{run_kexec} {shlex.join(load_args)}")


def _built_version(binary: Path) -> str | None:
    """What scripts/build-kernel or scripts/build-kexec recorded next to its output (meta.json)."""
    try:
        meta = json.loads((binary.parent / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    source = meta.get("source") or {}
    origin = source.get("version") or source.get("describe") or source.get("path") or source.get("kind")
    return f"built {meta.get('name', binary.parent.name)}: {origin}, sha256 {str(meta.get('sha256', ''))[:12]}"


def _version_of(images: Images, path: Path, package: str) -> str | None:
    return images.package(package).version if path == images.zimage else _built_version(path)


def guest_commands(case: PreparedCase) -> list[str]:
    """What the bench types in the stage-1 shell, in order (also written to the share as autorun.sh)."""
    # cache=mmap: kexec-tools mmaps the initrd, and without a page cache every 4 KiB fault is its own 9p
    # read (a 100 MB initrd took 13 s to load instead of 2.5 s). Plain reads and writes stay uncached, so
    # what the guest writes to the share is on the host when the command returns.
    mount = f"mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,cache=mmap {SHARE_TAG} {GUEST_SHARE}"
    save_dtb = [] if case.request.dtb else [f"cp /sys/firmware/fdt {GUEST_SHARE}/board.dtb"]
    run_kexec = case.kexec_command.split(" --debug")[0]
    # One round trip for the set-up: each command costs a console exchange with a TCG guest.
    # repro.sh's stage-1 init has mounted the share already before it runs these as autorun.sh.
    mount = f"{{ mountpoint -q {GUEST_SHARE} || {mount}; }}"
    setup = " && ".join([mount, f"cat /proc/iomem > {GUEST_SHARE}/iomem.txt", *save_dtb])
    return [setup, f"{run_kexec} --version",
            f"{case.kexec_command} > {GUEST_SHARE}/kexec-debug.txt 2>&1", f"{run_kexec} -e"]


def run_case(case: PreparedCase, say=lambda s: None) -> CaseResult:
    """Run the case from the profile's stage-1 snapshot when there is one (making it when there is not)."""
    version = ".".join(map(str, qemu_version()))
    slot = claim(case.stage1, version, say) if case.request.snapshot else None
    try:
        return _run_case(case, say, version, slot)
    except SnapshotBroken as err:
        assert slot is not None
        say(f"boot1: {err}; dropping that snapshot and booting instead")
        slot.drop()
        return _run_case(case, say, version, None)
    finally:
        if slot is not None:
            slot.release()


def _run_case(case: PreparedCase, say, version: str, slot: Slot | None) -> CaseResult:
    request = case.request
    timings: dict[str, float] = {}
    load: dict | None = None
    kexec_rc: int | None = None
    verdict = Verdict("error", "boot1", ("bench did not start",))
    observed: dict | None = None
    oracle: dict | None = None
    stage2 = None
    loader_version: str | None = None
    prediction: dict | None = None
    commands = guest_commands(case)
    (case.share / "autorun.sh").write_text("\n".join(commands) + "\n")
    phase = "boot1"
    incoming = slot.state if slot is not None and slot.ready else None
    stage1: dict = {"from": "snapshot" if incoming else "boot", "snapshot": slot.key if slot else None}
    try:
        # --gdb opens the gdbstub for the user (and lifts every deadline); --observe uses it itself.
        with QemuProcess(case.stage1, request.out, gdb=request.observing or request.gdb,
                         debugger_attached=request.gdb, incoming=incoming) as qemu:
            assert qemu.console is not None
            if request.gdb:
                say(f"gdbstub for you: gdb-multiarch -ex 'target remote {qemu.sockets.gdb}' (no deadlines)")
            console = qemu.console
            shell = Shell(console)
            t0 = time.monotonic()
            if incoming is not None:
                say("boot1: restoring the stage-1 snapshot")
                wait_restored(qemu)
                qemu.cont()
            else:
                qemu.cont()
                say("boot1: booting the stage-1 kernel")
                shell.wait_ready(TIMEOUTS["boot1"])
                if slot is not None and slot.lock_fd is not None:
                    say("boot1: saving the stage-1 snapshot for the next cases of this profile")
                    try:
                        timings["snapshot_save"] = slot.save(qemu, time.monotonic() - t0)
                        stage1["from"] = "boot, saved"
                    except BenchError as err:  # no snapshot is only slower: carry on with this boot
                        say(f"boot1: {err}")
                    qemu.cont()
            timings["boot1"] = time.monotonic() - t0
            t_setup = time.monotonic()
            for command in commands[:-2]:
                result = shell.run(command, TIMEOUTS["command"], command.split()[0])
                if result.rc != 0:
                    raise BenchError(f"stage-1 command failed ({result.rc}): {command}\n{result.output}")
                if command.endswith("--version"):
                    loader_version = _kexec_version(result.output)
            timings["setup"] = time.monotonic() - t_setup
            phase = "load"
            say("load: kexec --debug -l")
            mib = (case.inputs["initrd"].size >> 20) + 1
            loaded = shell.run(commands[-2], TIMEOUTS["load_base"] + TIMEOUTS["load_per_mib"] * mib, "kexec -l")
            timings["load"] = loaded.seconds
            kexec_rc = loaded.rc
            debug_text = (case.share / "kexec-debug.txt").read_text(errors="replace")
            log = _parse_load(debug_text)
            load = log.to_dict() if log else None
            prediction = _predict(log, case.zimage, loader_version)
            if loaded.rc in (126, 127):  # the shell could not run the loader at all: our problem
                raise BenchError(f"stage 1 could not run kexec (exit {loaded.rc}): {debug_text.strip()[:200]}")
            if loaded.rc != 0:
                tail = " | ".join(debug_text.strip().splitlines()[-3:])
                verdict = Verdict("fail", "load", (f"kexec -l exited {loaded.rc}: {tail}",))
            else:
                phase = "handoff"  # from here an observer failure belongs to kexec -e, not to the load
                observer = _observer(case, qemu, log, prediction) if request.observing else None
                if observer is not None:
                    observer.arm()
                say("handoff: kexec -e")
                t_exec = time.monotonic()
                start = shell.send(commands[-1])
                observation = None
                resumed_at = None
                if observer is not None:
                    observation = observer.observe(t_exec)
                    resumed_at = time.monotonic()
                    for stop in observation.stops:
                        if stop.seconds is not None:
                            timings[f"stop_{stop.name}"] = stop.seconds
                    timings["observe"] = resumed_at - t_exec
                    if observation.hang:  # no stop_kernel then: record how long the bench waited
                        timings[f"{observation.hang['phase']}_waited"] = observation.hang["waited"]
                if request.until == "kernel-entry":
                    ended_by = "kernel-entry"  # layout only: the ground truth is the verdict
                elif observation is not None and observation.phase in ("handoff", "decompress"):
                    ended_by = "observed"  # the stop never came: the VM was halted and dumped
                else:
                    entered = observation is not None and observation.phase == "kernel"
                    ended_by = watch_stage2(qemu, start, mib, resumed_at, entered)
                if observation is not None and ended_by in ("silence", "timeout") and qemu.running():
                    observation = replace(observation, kernel_log=kernel_log_from_ram(qemu, observer))
                timings["stage2"] = time.monotonic() - t_exec
                after = console.text[start:]
                if ended_by == "kernel-entry":
                    verdict = Verdict("pass", "kernel", (LAYOUT_ONLY,))
                else:
                    verdict = judge_stage2(after, request.stage2_cmdline, case.payload_sha256, ended_by)
                if verdict.verdict == "fail" and prediction is not None:
                    verdict = replace(verdict, reasons=verdict.reasons + _oracle_reasons(prediction))
                if observation is not None:
                    observed = observation.to_dict()
                    oracle = compare_oracle(observed, prediction)
                    verdict = judge_observation(verdict, observed, oracle)
                parsed = parse_stage2(after)
                stage2 = parsed.to_dict() if parsed else None
    except (ConsoleTimeout, ConsoleClosed) as err:
        # Only stage-1 waits get here (the stage-2 watch judges its own silence): a hang before kexec -e is
        # the bench's or stage 1's problem, not a kexec finding.
        tail = "\n".join(err.tail.splitlines()[-TAIL_IN_REASONS:])
        headline = str(err).splitlines()[0].removesuffix("; last console lines:")
        quoted = f"last console lines:\n{tail}" if tail.strip() else "the console printed nothing"
        verdict = Verdict("error", phase, (headline, quoted))
    except SnapshotBroken:
        raise  # run_case drops the snapshot and boots instead
    except BenchError as err:  # GdbError included: the observation itself broke
        verdict = Verdict("error", phase, (str(err),))
    # stop_* and observe lie inside stage2 (kexec -e to the end): not added twice
    timings["total"] = sum(v for k, v in timings.items() if k in ("boot1", "setup", "load", "stage2"))
    result = CaseResult(request=request, verdict=verdict, timings=timings, inputs=case.inputs, load=load,
                        stage2=stage2, kexec_rc=kexec_rc, qemu_version=version, predicted=prediction,
                        loader_version=loader_version, observed=observed, oracle=oracle, stage1=stage1,
                        image_set=case.image_set)
    write_case_artifacts(case, result, commands)
    return result


def _parse_load(text: str) -> kexeclog.KexecLog | None:
    try:
        return kexeclog.parse_kexec_log(text)
    except kexeclog.KexecLogError:
        return None


def _kexec_version(output: str) -> str | None:
    match = re.search(r"kexec-tools (\S+)", output)
    return match.group(1) if match else None


def _predict(log: kexeclog.KexecLog | None, zimage: ZImage, kexec_version: str | None) -> dict | None:
    """The oracle's view of the load kexec actually made: the same addresses, judged statically."""
    if log is None:
        return None
    try:
        return analyze(log, zimage=zimage, kexec_version=kexec_version).to_dict()
    except UserError as err:
        return {"verdict": "unknown", "error": str(err), "collisions": []}


def _oracle_reasons(prediction: dict) -> tuple[str, ...]:
    fatal = [c for c in prediction.get("collisions", []) if c.get("severity") == "fatal"]
    return tuple(f"oracle: {c['a']} x {c['b']} [{c['start']:#x}, {c['end']:#x}) fatal" for c in fatal)


def _observer(case: PreparedCase, qemu: QemuProcess, log: kexeclog.KexecLog | None,
              prediction: dict | None) -> Observer | None:
    if log is None or log.entry is None and log.kernel is None:
        raise BenchError("--observe: the kexec --debug output has no entry address to stop at")
    m = case.request.machine
    plan = make_plan(log, case.zimage, (m.ram_base, m.ram_base + case.request.ram), prediction,
                     {"kernel": case.share / "zImage", "initrd": case.share / "initrd.img"},
                     case.request.stage2_cmdline)
    return Observer(qemu.sockets.gdb, qemu.pmemsave, plan, case.request.out / "observe")


def kernel_log_from_ram(qemu: QemuProcess, observer: Observer) -> tuple[str, ...]:
    """After a silent stage 2: halt the VM (gdb has detached, so QMP owns it now) and grep the kernel's
    RAM for log lines; the log buffer lies in the kernel's data/bss above the kernel entry."""
    assert qemu.qmp is not None
    plan = observer.plan
    ram_end = plan.fill[1] if plan.fill else plan.kernel_entry + KERNEL_LOG_SPAN
    size = max(0, min(KERNEL_LOG_SPAN, ram_end - plan.kernel_entry))
    try:
        qemu.qmp.cmd("stop")
        path = observer.out / "silent-kernel-ram.bin"
        qemu.pmemsave(plan.kernel_entry, size, path)
        lines = kernel_log_lines(path.read_bytes())
        path.unlink()
        return lines
    except Exception as err:  # QEMU may exit under us (panic=-1): a missing post-mortem is not an error
        return (f"(no post-mortem dump: {err})",)


def watch_stage2(qemu: QemuProcess, start: int, mib: int, resumed_at: float | None = None,
                  kernel_entered: bool = False) -> str:
    """Read the console after kexec -e until the marker, QEMU's exit, silence, or the deadline.

    Silence only ends the wait before the new kernel has printed anything: that is the hang this bench
    exists for (a clobbered DTB or decompressor). Later quiet stretches (initramfs unpacking, the payload
    checksum) are legitimate and only the phase deadline applies to them. `resumed_at` is when the
    observer let the VM go: the time gdb held it stopped is not guest silence, and not stage-2 time.
    """
    console = qemu.console
    assert console is not None
    budget = TIMEOUTS["stage2_base"] + TIMEOUTS["stage2_per_mib"] * mib
    deadline = None if console.no_deadlines else time.monotonic() + budget * timeout_factor()
    quiet_since = resumed_at or 0.0
    silence = TIMEOUTS["silence_after_entry" if kernel_entered else "silence"] * timeout_factor()
    while True:
        try:
            found = console.wait_for(STAGE2_MARKER, 1.0, "stage 2", start, fail_on_close=False)
        except ConsoleTimeout:
            quiet = time.monotonic() - max(console.last_data_at, quiet_since)
            if (not console.no_deadlines and quiet > silence
                    and "Booting Linux" not in console.text[start:]):
                return "silence"
            if deadline is not None and time.monotonic() > deadline:
                return "timeout"
            continue
        return "exit" if found is None else "marker"
