"""A matrix of cases from a TOML file: axes, exclusions, expected verdicts; and the one runner of its cells.

Each cell runs as its own `testbench run` process (so a crash or a hang stays inside one cell, and the
runner's PR_SET_PDEATHSIG chain kills every QEMU if the matrix itself is killed), N at a time. The processes
fork from a server that has imported the bench once (multiprocessing's forkserver): a fresh interpreter
and its imports cost ~0.4 s of a 2-core host per cell. The front end is matrix_cli.py, shards shard.py.
"""

import hashlib
import itertools
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
import tomllib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

from .datafiles import data_path
from .errors import UserError
from .fileio import sha256_file
from .sizes import parse_size

DEFAULT_MATRIX = data_path("matrix.toml")
AXES = ("machine", "ram", "initrd", "placement", "kernel", "kexec", "memmap", "crashkernel", "smp")
STAGE2_BASE = 1 << 20  # busybox and init around the payload; only moves where the DTB lands
# What the cell server imports before it forks: everything a `testbench run` needs, the subcommand modules
# cli.build_parser() imports included.
PRELOAD = ["testbench.cli", "testbench.case", "testbench.oracle_cli", "testbench.replay_cli", "testbench.doctor"]
RUNNER_LOG = "runner.log"  # a cell process's stdout and stderr, in its artifact dir


@dataclass(frozen=True)
class Cell:
    machine: str
    ram: str
    initrd: str
    placement: str  # "default", "advised", or literal kexec args such as "--image-size=0x2000000"
    kernel: str = "debian"
    kexec: str = "debian"
    memmap: str = "plain"  # images/memmaps.toml
    crashkernel: str = ""  # SIZE[@ADDR]: mode kdump with stage 1's crashkernel= (kdump.py); "": kexec -l
    smp: int = 1  # QEMU -smp (testbench run --smp)
    expect: str | None = None

    @property
    def id(self) -> str:
        parts = [
            self.machine,
            self.ram,
            Path(self.kernel).name.replace(":", "-"),
            f"initrd{self.initrd}",
            "imagesize" if self.placement == "advised" else self.placement.lstrip("-").replace("=", ""),
        ]
        if self.kexec != "debian":
            parts.append(f"kexec-{Path(self.kexec).name.replace(':', '-')}")
        if self.memmap != "plain":
            parts.append(self.memmap)
        if self.crashkernel:
            parts.append(f"kdump{self.crashkernel.replace('@', 'at')}")
        if self.smp != 1:
            parts.append(f"smp{self.smp}")
        return "-".join(parts)

    @property
    def profile(self) -> tuple[str, ...]:
        """What decides the stage-1 snapshot a cell restores (snapshot.py keys it by these and the files; the
        crashkernel= reservation is in stage 1's command line)."""
        return (self.machine, self.ram, self.memmap, self.crashkernel, str(self.smp))

    def to_dict(self) -> dict:
        return {axis: getattr(self, axis) for axis in AXES} | {"id": self.id, "expect": self.expect}


def _matches(rule: dict, values: dict) -> bool:
    return all(str(values.get(k)) == str(v) for k, v in rule.items() if k != "verdict")


def load_matrix(path: Path | None = None, only: dict[str, list[str]] | None = None) -> list[Cell]:
    path = path or DEFAULT_MATRIX
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"matrix file {path}: no such file") from None
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"matrix file {path}: {err}") from None
    axes = data.get("axes", {})
    unknown = set(axes) - set(AXES)
    if unknown:
        raise UserError(f"matrix file {path}: unknown axes {sorted(unknown)}; known: {', '.join(AXES)}")
    for axis, chosen in (only or {}).items():
        if chosen:
            axes[axis] = chosen
    lists = [axes.get(axis, [Cell.__dataclass_fields__[axis].default]) for axis in AXES]
    cells = []
    for combo in itertools.product(*lists):
        values = dict(zip(AXES, combo, strict=True))
        if any(_matches(rule, values) for rule in data.get("exclude", [])):
            continue
        expect = next((rule["verdict"] for rule in data.get("expect", []) if _matches(rule, values)), None)
        cells.append(Cell(**values, expect=expect))
    seen: set[str] = set()
    for cell in cells:
        if cell.id in seen:  # results, shards and the merge all key cells by id
            raise UserError(f"matrix file {path}: two cells share the id {cell.id}")
        seen.add(cell.id)
    return cells


def kexec_args_for(cell: Cell) -> list[str]:
    """The kexec -l arguments of a cell; `advised` asks the oracle for this cell's smallest safe size."""
    if cell.placement == "default":
        return []
    if cell.placement != "advised":
        return cell.placement.split()
    from .inputs.images import kernel_path, loader_version
    from .inputs.memmap import get_memmap
    from .inputs.zimage import read_zimage
    from .machines import get_machine
    from .oracle import advise

    machine = get_machine(cell.machine)
    kernel = kernel_path(cell.kernel)
    ram = get_memmap(cell.memmap).ram_ranges(machine.ram_base, parse_size(cell.ram))
    advice = advise(
        read_zimage(kernel),
        ram,
        loader_version(cell.kexec),  # the cell's own loader: its release (or patched) rules
        initrd_size=parse_size(cell.initrd) + STAGE2_BASE,
        dtb_size=machine.dtb_size,
    )
    return [f"--image-size={advice.image_size:#x}"] if advice.needed else []


@dataclass(frozen=True)
class RunMode:
    """How every cell runs. By default with the emulator's ground truth (a cell passes only when the
    segments are intact at kernel entry and the oracle agrees) and from the stage-1 snapshots; stage 2
    hashes a sample of a large payload unless `full_hash` (payload_check.py)."""

    observe: bool = True
    until: str = "init"  # or "kernel-entry": layout verdicts only, no stage-2 boot
    snapshot: bool = True
    full_hash: bool = False

    @classmethod
    def from_flags(cls, no_observe: bool, until: str | None, no_snapshot: bool, full_hash: bool = False) -> "RunMode":
        return cls(observe=not no_observe, until=until or "init", snapshot=not no_snapshot, full_hash=full_hash)

    def to_dict(self) -> dict:
        return asdict(self)


def run_argv(cell: Cell, out: Path, mode: RunMode = RunMode()) -> list[str]:
    """The `testbench run` arguments of a cell (without the program name)."""
    args = [
        "run",
        "--machine",
        cell.machine,
        "--ram",
        cell.ram,
        "--initrd-size",
        cell.initrd,
        "--kernel",
        cell.kernel,
        "--kexec",
        cell.kexec,
        "--out",
        str(out),
        "--until",
        mode.until,
        "--memmap",
        cell.memmap,
    ]
    args += [] if mode.observe else ["--no-observe"]
    args += [] if mode.snapshot else ["--no-snapshot"]
    args += ["--full-hash"] if mode.full_hash else []
    args += ["--mode", "kdump", "--crashkernel", cell.crashkernel] if cell.crashkernel else []
    args += ["--smp", str(cell.smp)] if cell.smp != 1 else []
    extra = kexec_args_for(cell)
    return args + ([f"--kexec-args={' '.join(extra)}"] if extra else [])


def run_command(cell: Cell, out: Path, mode: RunMode = RunMode()) -> list[str]:
    """The same cell as a command line (repro and docs; the runner forks instead)."""
    return [sys.executable, "-m", "testbench.cli", *run_argv(cell, out, mode)]


def profile_order(cells: list[Cell], cost: Callable[[Cell], float] | None = None) -> list[Cell]:
    """The order cells start in. First one cell of each stage-1 profile, so the cells that boot and save a
    profile's snapshot run side by side instead of a second worker waiting for the first one's; then the
    rest longest first, so no long cell starts last while the other workers idle. Without costs, round-robin
    over the profiles."""
    groups: dict[tuple[str, ...], list[Cell]] = {}
    weight = cost or (lambda cell: 0.0)
    for cell in sorted(cells, key=lambda c: -weight(c)) if cost else cells:
        groups.setdefault(cell.profile, []).append(cell)
    if cost is None:
        rounds = itertools.zip_longest(*groups.values())
        return [cell for round_ in rounds for cell in round_ if cell is not None]
    firsts = sorted((group[0] for group in groups.values()), key=lambda c: -weight(c))
    rest = sorted((cell for group in groups.values() for cell in group[1:]), key=lambda c: -weight(c))
    return firsts + rest


def _die_with_parent() -> None:
    import ctypes

    # SIGTERM, not SIGKILL: the cell's runner must get the chance to stop its own QEMU.
    ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)


def _cell_process(argv: list[str], log: str, env: dict[str, str], cwd: str) -> None:
    """The body of a cell process: `testbench run ARGV` with stdout and stderr in the cell's runner.log, in
    the caller's environment and directory as they are now (the server holds those of its own start)."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    _die_with_parent()  # the server forked us: if it goes (the matrix died), so do we, and our QEMU
    from .cli import main

    sys.exit(main(argv))


_context_lock = threading.Lock()


def _context():
    with _context_lock:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        return ctx


class CellRunner:
    """Runs cells as processes and can stop every running one (Ctrl-C, SIGTERM of the matrix)."""

    def __init__(self) -> None:
        self.live: set = set()
        self.lock = threading.Lock()
        self.stopping = False

    def run(self, argv: list[str], log: Path) -> int:
        process = _context().Process(
            target=_cell_process, args=(argv, str(log), dict(os.environ), os.getcwd()), daemon=False
        )
        with self.lock:
            if self.stopping:
                return 130
            process.start()
            self.live.add(process)
        try:
            process.join()
        finally:
            with self.lock:
                self.live.discard(process)
        return process.exitcode if process.exitcode is not None else 2

    def stop(self) -> None:
        """SIGTERM every running cell (its runner stops its QEMU) and wait for them."""
        with self.lock:
            self.stopping = True
            running = list(self.live)
        for process in running:
            process.terminate()
        for process in running:
            process.join(30)


def run_cell(cell: Cell, out: Path, mode: RunMode = RunMode(), runner: CellRunner | None = None) -> dict:
    """Run one cell in its own process; returns its result.json (or an `error` record)."""
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        argv = run_argv(cell, out, mode)
    except UserError as err:
        return _finish(cell, {"verdict": "error", "phase": "boot1", "reasons": [str(err)]}, started)
    log = out / RUNNER_LOG
    code = (runner or CellRunner()).run(argv, log)
    result_path = out / "result.json"
    if result_path.exists():
        result = json.loads(result_path.read_text())
    else:
        tail = log.read_text(errors="replace").strip()[-500:] if log.exists() else ""
        result = {"verdict": "error", "phase": "boot1", "reasons": [tail or f"runner exited {code}"]}
    return _finish(cell, result, started)


def _finish(cell: Cell, result: dict, started: float) -> dict:
    result["cell"] = cell.to_dict()
    result["wall_seconds"] = round(time.monotonic() - started, 2)
    result["expected_ok"] = cell.expect is None or result["verdict"] == cell.expect
    return result


def run_matrix(
    cells: list[Cell],
    out: Path,
    jobs: int,
    progress=None,
    mode: RunMode = RunMode(),
    cost: Callable[[Cell], float] | None = None,
) -> list[dict]:
    """Every cell, `jobs` at a time, into OUT/<cell id>; results in the matrix's order."""
    results: list[dict] = []
    started = time.monotonic()
    runner = CellRunner()
    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        futures = {
            pool.submit(run_cell, cell, out / cell.id, mode, runner): cell for cell in profile_order(cells, cost)
        }
        for future in as_completed(futures):
            results.append(future.result())
            if progress:
                progress(len(results), len(cells), results[-1], time.monotonic() - started)
    except BaseException:
        # Ctrl-C / SIGTERM: start no queued cell and stop the running ones (each runner stops its QEMU).
        pool.shutdown(wait=False, cancel_futures=True)
        runner.stop()
        raise
    pool.shutdown()
    order = {cell.id: i for i, cell in enumerate(cells)}
    return sorted(results, key=lambda r: order[r["cell"]["id"]])


def bench_version() -> str:
    """The package version and a hash of its code and data: shards of one run agree on it, shards of two
    checkouts do not (report merge refuses to mix them)."""
    root = Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        code = path.suffix == ".py" or "data" in path.relative_to(root).parts[:1]
        # durations.toml only balances shards: storing new durations does not make another bench
        if path.is_file() and code and "__pycache__" not in path.parts and path.name != "durations.toml":
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    try:
        version = metadata.version("testbench")
    except metadata.PackageNotFoundError:
        version = "0"
    return f"{version}+{digest.hexdigest()[:12]}"


def identity(matrix: Path, only: dict[str, list[str]], mode: RunMode) -> dict:
    """What must be the same for shards to be parts of one matrix run (report merge checks it)."""
    from .inputs.lock import lock_path

    lock = lock_path()
    return {
        "matrix": {"path": str(matrix), "sha256": sha256_file(matrix)},
        "selection": {axis: sorted(values) for axis, values in only.items() if values},
        "mode": mode.to_dict(),
        "lock_sha256": sha256_file(lock) if lock.exists() else None,
        "bench_version": bench_version(),
    }
