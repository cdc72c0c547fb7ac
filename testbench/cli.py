"""`testbench` command line. Thin: parse, call the stage modules, print, exit 0/1/2.

Exit codes: 0 pass (or success), 1 fail, 2 error or bad input. Bad input is one line on stderr, never a
traceback; SIGTERM and Ctrl-C unwind through the same cleanup paths, so no QEMU outlives the command.
"""

import argparse
import importlib
import signal
import sys
import time
from pathlib import Path

from .errors import BenchError, UserError
from .modes import CRASHKERNEL_DEFAULT, MODES
from .sizes import format_size, parse_size
from .verdict import UNTIL

SUBCOMMAND_MODULES = ("oracle_cli", "replay_cli", "doctor", "matrix_cli", "report.merge")
DEMO_PLACEMENTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("default", ()),
    ("image-size", ("--image-size=0x2000000",)),
)


def _say(text: str) -> None:
    print(f"[testbench] {text}", file=sys.stderr, flush=True)


def _run_one(
    args: argparse.Namespace,
    machine_name: str,
    ram: str | None,
    kexec_args: tuple[str, ...],
    out: Path,
    quiet: bool = False,
):
    from .case import CaseRequest, prepare_case, run_case
    from .emulator.qemu import qemu_version
    from .inputs.images import debian_suite, kernel_path, kexec_path, kexec_suite, load_images
    from .inputs.lock import read_lock
    from .machines import get_machine

    machine = get_machine(machine_name)
    if getattr(args, "smp", None) is not None:
        machine = machine.with_smp(args.smp)
    qemu_version()  # fail early, with a clear line, when QEMU is missing or too old
    stage1_debian, stage1_suite = debian_suite(getattr(args, "stage1_kernel", None))
    if not stage1_debian:
        raise UserError("--stage1-kernel: only debian or debian:SUITE (stage 1 needs the package's modules)")
    images = load_images(stage1_suite)
    # plain `debian` is the lock's default suite, whichever suite stage 1 runs
    kernel_debian, kernel_suite = debian_suite(args.kernel)
    kernel: Path | None = kernel_path(args.kernel)
    if kernel == images.zimage:
        kernel = None  # the stage-1 kernel again
    default_suite = read_lock().default_suite
    kexec = kexec_path(args.kexec)
    request = CaseRequest(
        machine=machine,
        ram=parse_size(ram, "--ram") if ram else machine.default_ram,
        out=out,
        kernel=kernel,
        initrd=Path(args.initrd) if args.initrd else None,
        initrd_size=parse_size(args.initrd_size, "--initrd-size"),
        seed=args.seed,
        dtb=Path(args.dtb) if args.dtb else None,
        kexec=kexec,
        kexec_suite=None if kexec else kexec_suite(args.kexec) or default_suite,
        kernel_suite=(kernel_suite or default_suite) if kernel_debian else None,
        kexec_args=kexec_args,
        gdb=getattr(args, "gdb", False),
        # Observed unless --no-observe: the emulator's ground truth is the point. --gdb hands the gdbstub
        # (it takes one client) to the user's debugger instead.
        observe=not getattr(args, "no_observe", False) and not getattr(args, "gdb", False),
        snapshot=not getattr(args, "no_snapshot", False),
        until=getattr(args, "until", "init"),
        memmap=getattr(args, "memmap", "plain"),
        full_hash=getattr(args, "full_hash", False),
        mode=getattr(args, "mode", "kexec"),
        crashkernel=getattr(args, "crashkernel", None) or CRASHKERNEL_DEFAULT,
    )
    case = prepare_case(request, images)
    return run_case(case, say=(lambda s: None) if quiet else (lambda s: _say(f"{machine_name}: {s}")))


def cmd_run(args: argparse.Namespace) -> int:
    kexec_args = tuple(args.kexec_args.split()) if args.kexec_args else ()
    if args.machine is None:
        return _demo(args)
    out = Path(args.out) if args.out else Path("out") / f"{args.machine}-{time.strftime('%Y%m%d-%H%M%S')}"
    result = _run_one(args, args.machine, args.ram, kexec_args, out)
    v = result.verdict
    print(f"{v.verdict} (phase {v.phase}) in {result.timings.get('total', 0):.1f}s")
    for reason in v.reasons:
        print(f"  - {reason}")
    print(f"artifacts: {out}")
    return {"pass": 0, "fail": 1}.get(v.verdict, 2)


def _demo(args: argparse.Namespace) -> int:
    """No --machine: every machine, with kexec's default placement and with a large enough --image-size."""
    from .machines import all_machines

    root = Path(args.out) if args.out else Path("out") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    rows = []
    for name in all_machines():
        for label, extra in DEMO_PLACEMENTS:
            _say(f"{name} / {label}: running")
            result = _run_one(args, name, args.ram, extra, root / f"{name}-{label}", quiet=True)
            v = result.verdict
            rows.append((name, label, result))
            _say(f"{name} / {label}: {v.verdict} (phase {v.phase}) {result.timings.get('total', 0):.1f}s")
    total = sum(r.timings.get("total", 0.0) for _, _, r in rows)
    print(f"{'machine':<14}{'placement':<12}{'verdict':<9}{'phase':<9}{'time':>7}  {'oracle':<8}observed / reason")
    for name, label, result in rows:
        v = result.verdict
        agrees = "-" if result.agreement is None else "agrees" if result.agreement.agrees else "DIFFERS"
        head = f"{name:<14}{label:<12}{v.verdict:<9}{v.phase:<9}{result.timings.get('total', 0.0):>6.1f}s  {agrees:<8}"
        for i, line in enumerate(_demo_findings(result)):
            print((head if i == 0 else " " * len(head)) + line)
    print(f"total {total:.0f}s for {len(rows)} cases; artifacts: {root}")
    return 2 if any(r.verdict.verdict == "error" for _, _, r in rows) else 0


def _demo_findings(result) -> list[str]:
    """What the emulator saw clobbered, a line per segment (byte range, bytes changed, offset of the first);
    else the verdict's first reason, and the oracle's first fatal collision when no ground truth was taken."""
    observed = result.observation.clobbered if result.observation is not None else ()
    lines = []
    for segment in dict.fromkeys(c.segment for c in observed):
        runs = [c for c in observed if c.segment == segment]
        changed = sum(c.end - c.start for c in runs)
        pieces = f" in {len(runs)} runs" if len(runs) > 1 else ""
        lines.append(
            f"{segment} [{runs[0].start:#x}, {runs[-1].end:#x}) clobbered: {changed:#x} bytes{pieces}, "
            f"from +{runs[0].offset:#x}"
        )
    if lines:
        return lines
    reasons = result.verdict.reasons
    shown = [reasons[0][:100]] if reasons else [""]
    if result.observation is None:
        shown += [r[:100] for r in reasons[1:] if r.startswith("oracle:")][:1]
    return shown


def cmd_images(args: argparse.Namespace) -> int:
    from .inputs.fetch import fetch_images, lock_images
    from .inputs.images import load_images

    if args.action == "lock":
        lock_images(args.suite, _say)
        return 0
    if args.action == "facts":
        from .inputs.kernelinfo import kernel_info

        for row in kernel_info(load_images(args.suite)).rows():
            print(f"{row[0]:<36}{row[1]}")
        return 0
    if args.action == "fetch":
        images = fetch_images(args.suite, _say, drift_ok=True if args.allow_drift else None)
    else:
        images = load_images(args.suite)
    for package in images.packages:
        print(f"{package.name:<28} {package.version:<34} {package.sha256}")
    for item in images.drift:
        print(f"DRIFT {item.describe()}")
    print(f"cache: {images.root}  suite: {images.suite}  kernel: {images.kernel_release}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="testbench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="boot stage 1, kexec -l / -e into stage 2, judge the result")
    run.add_argument("--machine", help="machine profile (no --machine: the demonstration over all machines)")
    run.add_argument("--ram", help="RAM size, e.g. 512M, 1G (default: the machine's default)")
    run.add_argument("--smp", type=int, help="CPUs for QEMU (-smp N; default 1, at most the machine's max_smp)")
    run.add_argument(
        "--kernel",
        default="debian",
        help="zImage to kexec into: 'debian' (the default suite's), 'debian:SUITE', 'built:VARIANT' "
        "(scripts/build-kernel) or a path",
    )
    run.add_argument(
        "--stage1-kernel",
        default="debian",
        help="the first kernel, which runs kexec: 'debian' or 'debian:SUITE' (default: the default suite's)",
    )
    initrd = run.add_mutually_exclusive_group()
    initrd.add_argument("--initrd-size", default="1M", help="stage-2 payload size (default 1M)")
    initrd.add_argument("--initrd", help="use this initrd instead of the generated stage-2 one")
    run.add_argument("--seed", type=int, default=1, help="payload seed (default 1)")
    run.add_argument("--dtb", help="DTB for the second kernel (default: the one stage 1 booted with)")
    run.add_argument(
        "--kexec",
        default="debian",
        help="kexec binary: 'debian' (the default suite's kexec-tools), 'debian:SUITE', 'built:NAME' "
        "(scripts/build-kexec) or a path to an ARM build",
    )
    run.add_argument("--kexec-args", default="", help='extra kexec -l arguments, e.g. "--image-size=0x2000000"')
    run.add_argument("--out", help="artifact dir (default out/<machine>-<time>)")
    run.add_argument("--gdb", action="store_true", help="a debugger will attach: disable all deadlines")
    observe = run.add_mutually_exclusive_group()
    observe.add_argument(
        "--no-observe",
        action="store_true",
        help="no ground truth: judge from the console and the oracle alone (by default the bench stops at "
        "the zImage and kernel entry via the gdbstub, dumps and diffs every segment, and checks the oracle "
        "against it)",
    )
    observe.add_argument("--observe", action="store_true", help="the default; kept for older scripts")
    run.add_argument(
        "--until",
        choices=UNTIL,
        default="init",
        help="kernel-entry: a layout verdict from the ground truth at the kernel entry, without "
        "booting stage 2 (observed even with --no-observe)",
    )
    run.add_argument(
        "--memmap", default="plain", help="stage 1's RAM map from images/memmaps.toml, e.g. hole32M (default plain)"
    )
    run.add_argument(
        "--no-snapshot",
        action="store_true",
        help="boot stage 1 instead of restoring its saved state (the state is keyed by QEMU, "
        "machine, RAM and the stage-1 files, and made by the first case of each profile)",
    )
    run.add_argument(
        "--full-hash",
        action="store_true",
        help="stage 2 hashes the whole payload; by default an observed case over 4 MiB has it sampled "
        "(its size and 18 seeded 64 KiB blocks: the observer proved every byte at the kernel entry)",
    )
    run.add_argument(
        "--mode",
        choices=MODES,
        default="kexec",
        help="kdump: stage 1 boots with crashkernel=, kexec -p loads the crash kernel, a panic (sysrq c) starts "
        "it; it passes when its init sees its command line, initrd payload, DTB and a sound /proc/vmcore",
    )
    run.add_argument(
        "--crashkernel",
        metavar="SIZE[@ADDR]",
        help=f"stage 1's crashkernel= in --mode kdump (default {CRASHKERNEL_DEFAULT}), e.g. 64M@0x50000000",
    )
    run.set_defaults(func=cmd_run)

    images = sub.add_parser("images", help="fetch, list or lock the Debian armhf inputs (images/lock.toml)")
    images.add_argument(
        "action",
        choices=("fetch", "list", "lock", "facts"),
        help="fetch: install the locked set into the cache; list: show it; lock: rewrite the "
        "suite's locked set from the archive as it is now; facts: what the suite's kernel is (its zImage's "
        "tag and decompressor constants, and its config)",
    )
    images.add_argument("--suite", help="Debian suite, e.g. bookworm or trixie (default: the lock's default)")
    images.add_argument(
        "--allow-drift",
        action="store_true",
        help="fetch: when a locked version left the archive, take the current set and record "
        "the drift (same as TESTBENCH_ALLOW_DRIFT=1)",
    )
    images.set_defaults(func=cmd_images)

    # Each further stage adds its own subcommands through a module-level register(subparsers).
    for module_name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(f".{module_name}", __package__)
        except ModuleNotFoundError as err:
            if err.name != f"{__package__}.{module_name}":
                raise
            continue
        module.register(sub)
    return parser


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# Options whose value is itself kexec options: argparse refuses `--kexec-args --image-size=X` (a value that
# starts with "--"), so the pair is glued into `--kexec-args=--image-size=X` before parsing.
DASH_VALUED = ("--kexec-args",)


def _glue_dash_values(argv: list[str]) -> list[str]:
    out: list[str] = []
    items = iter(argv)
    for item in items:
        if item in DASH_VALUED:
            value = next(items, None)
            out.append(item if value is None else f"{item}={value}")
        else:
            out.append(item)
    return out


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    parser = build_parser()
    args = parser.parse_args(_glue_dash_values(sys.argv[1:] if argv is None else argv))
    try:
        return args.func(args)
    except UserError as err:
        print(f"testbench: {err}", file=sys.stderr)
        return 2
    except BenchError as err:
        print(f"testbench: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("testbench: interrupted; QEMU stopped", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 2


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["main", "format_size"]
