"""The crash kernel's boot allocations, measured in QEMU (`testbench advise --crash --measure`), and the
file that keeps them (oracle/crash_memory.py is the model they feed).

A measurement runs kdump cases on one board at whole-MiB `crashkernel=` sizes, from the size the model
predicts, down while they pass and up while they fail, until it holds the smallest size that reaches init
and the one 1 MiB below that does not. From the passing run's "Memory: NK/MK available" line it keeps two
numbers for that zImage (by sha256) on that board: the kernel's own reservations and what its boot
allocates besides the initramfs's files. The bench ships the numbers it measured for Debian's kernels
(data/crash-memory.toml); a user's measurements go to the cache and are read first.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from .datafiles import data_path
from .errors import UserError
from .fileio import sha256_file, write_atomic
from .inputs.images import cache_dir
from .oracle.crash_memory import BootMemory, CrashMemoryInputs, measured_facts

FACTS_FILE = "crash-memory.toml"
MEMORY_LINE = re.compile(r"Memory: (\d+)K/(\d+)K available")
CRASH_CMDLINE = re.compile(r"Kernel command line: [^\n]*elfcorehdr=")
MAX_STEPS = 12  # runs a measurement may take before it gives up (each is a stage-1 boot and a crash)


def user_facts_path() -> Path:
    return cache_dir() / FACTS_FILE


def _read(path: Path) -> dict[str, BootMemory]:
    import tomllib

    if not path.is_file():
        return {}
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not a readable crash-memory file ({err})") from None
    out = {}
    for key, entry in data.get("measured", {}).items():
        try:
            out[key] = BootMemory(**entry)
        except TypeError as err:
            raise UserError(f"{path}: entry {key}: {err}") from None
    return out


def _key(zimage_sha256: str, machine: str) -> str:
    return f"{zimage_sha256}.{machine}"


def boot_memory(zimage: Path, machine: str) -> BootMemory | None:
    """The measured boot allocations of this zImage on this board: the user's first, then the bench's."""
    key = _key(sha256_file(zimage), machine)
    for path in (user_facts_path(), data_path(FACTS_FILE)):
        found = _read(path).get(key)
        if found is not None:
            return found
    return None


def tightest(old: BootMemory | None, new: BootMemory) -> BootMemory:
    """Every run that reached init bounds the boot allocations from above, each at its own point of the
    1 MiB grid of mem=: keep the lowest bound and say which runs gave it."""
    if old is None or new.boot_kib >= old.boot_kib:
        return new if old is None else replace(old, source=f"{old.source}; {new.source} gave {new.boot_kib}K")
    return replace(new, source=f"{new.source}; before: {old.boot_kib}K ({old.source})")


def store_boot_memory(fact: BootMemory, path: Path | None = None) -> BootMemory:
    """Fold a measurement into the user's file (a measured build's earlier numbers tighten it)."""
    path = path or user_facts_path()
    key = _key(fact.zimage_sha256, fact.machine)
    known = _read(path)
    fact = tightest(known.get(key) or _read(data_path(FACTS_FILE)).get(key), fact)
    merged = known | {key: fact}
    lines = [
        "# The crash kernel's boot memory per zImage (sha256) and board, measured by",
        "# `testbench advise --crash --measure` (testbench/crash_measure.py; the model: oracle/crash_memory.py).",
    ]
    for key, f in sorted(merged.items()):
        lines += ["", f"[measured.{json.dumps(key)}]"]
        lines += [f"{name} = {json.dumps(value)}" for name, value in f.to_dict().items() if value is not None]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, ("\n".join(lines) + "\n").encode())
    return fact


@dataclass(frozen=True)
class Probe:
    size_mib: int
    verdict: str
    phase: str
    reason: str
    mem_kib: int | None  # the crash kernel's mem= and what its Memory: line said
    available_kib: int | None
    seconds: float


def crash_memory_line(console: str) -> tuple[int, int] | None:
    """(available, total) KiB from the crash kernel's "Memory:" line: the first after the command line that
    carries elfcorehdr= (stage 1 printed its own earlier); None when the crash kernel got no further."""
    lines = list(CRASH_CMDLINE.finditer(console))
    found = MEMORY_LINE.search(console, lines[-1].end()) if lines else None
    return (int(found.group(1)), int(found.group(2))) if found else None


@dataclass(frozen=True)
class Measurement:
    probes: tuple[Probe, ...]
    smallest: Probe | None
    fact: BootMemory | None
    note: str


def measure(
    run_at: Callable[[int], Probe],
    inputs: CrashMemoryInputs,
    start_mib: int,
    floor_mib: int,
    zimage_sha256: str,
    machine: str,
    say: Callable[[str], None],
    what: str = "",
) -> Measurement:
    """Walk whole-MiB sizes from `start_mib` (never below `floor_mib`, the layout's) to the smallest passing
    one with a failing neighbour below it. `run_at(n)` runs a kdump case at crashkernel=nM; `inputs` is the
    memory model's view of the placement, the same at every size (only the ELF core header moves)."""
    probes: dict[int, Probe] = {}

    def probe(n: int) -> Probe:
        if n not in probes:
            say(f"crashkernel={n}M: running")
            probes[n] = run_at(n)
            p = probes[n]
            say(f"crashkernel={n}M: {p.verdict} ({p.phase}) {p.reason}")
        return probes[n]

    n = max(start_mib, floor_mib)
    while len(probes) < MAX_STEPS:
        p = probe(n)
        if p.verdict == "error":
            return Measurement(tuple(probes.values()), None, None, f"the bench failed at {n}M: {p.reason}")
        if p.verdict == "pass":
            if n == floor_mib or probe(n - 1).verdict == "fail":
                break
            n -= 1
        else:
            n += 1
    else:
        return Measurement(tuple(probes.values()), None, None, f"no answer within {MAX_STEPS} runs")
    smallest = probes[n]
    if smallest.mem_kib is None or smallest.available_kib is None:
        return Measurement(tuple(probes.values()), smallest, None, "the crash kernel printed no Memory: line")
    own, boot = measured_facts(inputs, smallest.mem_kib << 10, smallest.available_kib << 10)
    below = probes.get(n - 1)
    fact = BootMemory(
        zimage_sha256=zimage_sha256,
        machine=machine,
        boot_kib=boot >> 10,
        reserved_kib=own >> 10,
        passed_mem_kib=smallest.mem_kib,
        failed_mem_kib=below.mem_kib if below is not None else None,
        source=f"measured {time.strftime('%Y-%m-%d')} by testbench advise --crash --measure{what}",
    )
    return Measurement(tuple(sorted(probes.values(), key=lambda p: p.size_mib)), smallest, fact, "")


def probe_from_result(size_mib: int, result, out: Path, seconds: float, keep: bool) -> Probe:
    """A kdump case's result as one probe (its console's last Memory: line is the crash kernel's)."""
    console = (out / "console.log").read_text(errors="replace") if (out / "console.log").is_file() else ""
    line = crash_memory_line(console)
    reasons = result.verdict.reasons
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    return Probe(
        size_mib,
        result.verdict.verdict,
        result.verdict.phase,
        reasons[0][:160] if reasons else "",
        line[1] if line else None,
        line[0] if line else None,
        seconds,
    )


def crash_runtime(
    kernel: str | None, zimage: Path, machine: str | None, initrd: Path | None, initrd_size: int | None, cma: int | None
):
    """What advise --crash knows of the crash kernel's memory, each number with where it came from."""
    from .crash_cli import CrashRuntime
    from .inputs.initrd_files import initrd_file_sizes
    from .inputs.kernelinfo import debian_cma
    from .oracle.crash_memory import CMA_ALIGN, page_rounded

    notes = []
    if initrd is not None:
        files = page_rounded(initrd_file_sizes(initrd))
        notes.append(f"initramfs files {files >> 10}K (page-rounded, read from {initrd})")
    elif initrd_size:
        files = page_rounded([initrd_size])
        notes.append(f"initramfs files taken as the archive's {files >> 10}K (give --initrd FILE for its contents)")
    else:
        files = 0
    cma_align = CMA_ALIGN
    if cma is None:
        config = debian_cma(kernel)
        if config is None:
            cma = 0
            notes.append("no CMA area assumed (a kernel without its package config: give --cma, Debian's is 16M)")
        else:
            cma, cma_align = config
            notes.append(f"CMA area {cma >> 20} MiB on {cma_align >> 20} MiB (the package's config)")
    else:
        notes.append(f"CMA area {cma >> 20} MiB (--cma), on {cma_align >> 20} MiB")
    boot = boot_memory(zimage, machine) if machine else None
    if machine is None:
        notes.append("no --machine: boot allocations are measured per board")
    return CrashRuntime(files, cma, boot, tuple(notes), cma_align)


def run_measurement(args, zimage, ram: tuple[int, int], start: int, dtb: int | None, fixed_base: bool) -> int:
    """`advise --crash --measure`: kdump cases around the model's size with the bench's own initrd (its
    init reports payload, DTB and vmcore), the smallest passing size, and its numbers stored."""
    import argparse
    import tempfile

    from .cli import _run_one
    from .crash_cli import crash_advise, memory_inputs
    from .inputs.images import kernel_path, load_images
    from .inputs.initramfs import cached_stage2_initrd
    from .sizes import parse_size

    if args.machine is None:
        raise UserError("--measure runs the crash kernel in QEMU: give --machine")
    if args.initrd:
        raise UserError("--measure loads the bench's own initrd (its init checks the crash): give --initrd-size")
    payload = parse_size(args.initrd_size, "--initrd-size") if args.initrd_size else 1 << 20
    built = cached_stage2_initrd(load_images(), payload, 1)
    path = kernel_path(args.kernel)
    cma = parse_size(args.cma, "--cma") if args.cma else None
    runtime = crash_runtime(args.kernel, path, args.machine, built.path, None, cma)
    version = args.kernel_version or "6.1"
    advice = crash_advise(zimage, ram, start, args.kexec_version, version, built.path.stat().st_size, dtb, runtime)
    inputs = memory_inputs(replace(runtime, boot=None), advice.placement, advice.judged.kernel_address, zimage)
    kexec_args = (f"--image-size={advice.image_size:#x}",) if advice.image_size else ()
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="tb-crash-measure-"))
    placement = " ".join(kexec_args) or "default placement"
    print(
        f"{args.kernel} on {args.machine}: the bench's initrd with a {payload >> 10}K payload "
        f"({built.path.stat().st_size} bytes, files {runtime.files >> 10}K); {placement}"
    )
    kept = f"; runs kept in {root}" if args.out else ""
    print(f"the model says {advice.size >> 20}M (layout {advice.layout_size >> 20}M){kept}")

    def run_at(n: int) -> Probe:
        where = f"@{start:#x}" if fixed_base else ""
        ns = argparse.Namespace(
            kernel=args.kernel, initrd=None, initrd_size=str(payload), seed=1, dtb=None, kexec=None,
            stage1_kernel=None, smp=None, mode="kdump", crashkernel=f"{n}M{where}", no_snapshot=True,
        )  # fmt: skip
        out = root / f"crashkernel-{n}M"
        t0 = time.monotonic()
        result = _run_one(ns, args.machine, None, kexec_args, out, quiet=True)
        return probe_from_result(n, result, out, time.monotonic() - t0, keep=args.out is not None)

    m = measure(
        run_at, inputs, advice.size >> 20, advice.layout_size >> 20, sha256_file(path), args.machine,
        lambda s: print(f"  {s}", flush=True), f", {payload >> 10}K payload",
    )  # fmt: skip
    if args.out is None:
        shutil.rmtree(root, ignore_errors=True)  # each run's dir went with it; keep them with --out
    print(f"\n{'crashkernel':>12}{'mem':>10}{'available':>11}  verdict")
    for p in m.probes:
        mem = f"{p.mem_kib}K" if p.mem_kib else "-"
        avail = f"{p.available_kib}K" if p.available_kib else "-"
        print(f"{p.size_mib:>11}M{mem:>10}{avail:>11}  {p.verdict} ({p.phase}) {p.reason}")
    if m.fact is None:
        print(f"\nno measurement: {m.note}")
        return 2
    assert m.smallest is not None
    said = "the model said so" if m.smallest.size_mib == advice.size >> 20 else f"the model said {advice.size >> 20}M"
    print(f"\nsmallest: crashkernel={m.smallest.size_mib}M ({said})")
    stored = store_boot_memory(m.fact)
    print(f"this run: boot allocations <= {m.fact.boot_kib}K, own reservations {m.fact.reserved_kib}K")
    print(f"stored in {user_facts_path()}: boot {stored.boot_kib}K ({stored.source})")
    return 0
