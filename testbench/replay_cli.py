"""`testbench replay` on the command line: the arguments, their bad-input checks (each one line) and the
printed summary; the replay itself is testbench.replay."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from .errors import UserError
from .inputs.attempts import Attempt, split_attempts
from .machines import Machine, get_machine
from .observe.observer import STOP_DEADLINES
from .replay import ReplayRequest, replay
from .sizes import parse_size
from .verdict import UNTIL


def _address(text: str, base: int, what: str) -> int:
    """An absolute address, or `+OFFSET` relative to RAM base."""
    try:
        return base + parse_size(text[1:], what) if text.startswith("+") else int(text, 0)
    except ValueError:
        raise UserError(f"{what}: {text!r} is not an address (0x... or +offset from RAM base)") from None


def _file(path: str, role: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{role} {path}: no such file")
    return p


def _addresses(args: argparse.Namespace, m: Machine) -> tuple[int, int | None, int | None, int | None]:
    """(kernel, initrd, dtb, the log's initrd size) as absolute addresses on `m`."""
    if getattr(args, "attempt", None) is not None and not args.from_log:
        raise UserError("--attempt picks an attempt of --from-log: give --from-log too")
    if args.from_log:
        log = pick_attempt(args.from_log, getattr(args, "attempt", None)).log
        assert log.kernel is not None and log.dtb is not None  # pick_attempt returns complete attempts only
        base = log.memory_ranges[0][0]
        return (
            log.kernel.address - base + m.ram_base,
            log.initrd.address - base + m.ram_base if log.initrd else None,
            log.dtb.address - base + m.ram_base if log.dtb else None,
            log.initrd.size if log.initrd else None,
        )
    if args.kernel_at is None or args.dtb_at is None:
        raise UserError("replay needs --kernel-at and --dtb-at (and --initrd-at with --initrd), or --from-log")
    return (
        _address(args.kernel_at, m.ram_base, "--kernel-at"),
        _address(args.initrd_at, m.ram_base, "--initrd-at") if args.initrd_at else None,
        _address(args.dtb_at, m.ram_base, "--dtb-at"),
        None,
    )


def pick_attempt(path: str, number: int | None) -> Attempt:
    """Attempt `number` (1-based) of the log, or its first complete one: MEMORY RANGES, Kernel: and DT lines."""
    paste = split_attempts(_file(path, "--from-log").read_text(errors="replace"))
    attempts = paste.attempts
    complete = [a.index for a in attempts if a.complete]
    have = f"complete: {', '.join(map(str, complete))}" if complete else "none complete"
    if number is None:
        if not complete:
            raise UserError(
                f"{path}: no attempt has MEMORY RANGES, a 'Kernel:' line and a 'DT' line to replay "
                f"({len(attempts)} attempt{'s' if len(attempts) != 1 else ''})"
            )
        return attempts[complete[0] - 1]
    if not 1 <= number <= len(attempts):
        raise UserError(f"--attempt {number}: {path} holds {len(attempts)} attempt(s), 1-{len(attempts)} ({have})")
    if number not in complete:
        raise UserError(
            f"--attempt {number}: it lacks MEMORY RANGES, a 'Kernel:' line or a 'DT' line to replay ({have})"
        )
    return attempts[number - 1]


def _debian_kernel_version() -> str:
    from .inputs.images import load_images

    images = load_images()
    return images.package(images.kernel_package).version


def request_from_args(args: argparse.Namespace) -> ReplayRequest:
    """The command line's bad input, each one line (UserError): machine, RAM, files, addresses, sizes."""
    m = get_machine(args.machine)
    ram = parse_size(args.ram, "--ram") if args.ram else m.default_ram
    m.check_ram(ram)
    out = Path(args.out or f"out/replay-{m.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    from .inputs.images import kernel_path

    debian = args.kernel in (None, "debian")
    kernel = kernel_path(args.kernel) if debian else _file(args.kernel, "kernel")
    memory_start = None
    if getattr(args, "memory_start", None):
        memory_start = _address(args.memory_start, m.ram_base, "--memory-start")
        if not m.ram_base <= memory_start < m.ram_base + ram - (128 << 20):
            raise UserError(
                f"--memory-start {memory_start:#x}: must lie in {m.name}'s RAM and leave at least 128M above it"
            )
    kernel_at, initrd_at, dtb_at, log_initrd_size = _addresses(args, m)
    size = getattr(args, "initrd_size", None)
    if args.initrd is not None and size:
        raise UserError("--initrd and --initrd-size exclude each other")
    initrd = _file(args.initrd, "initrd") if args.initrd is not None else None
    if size is not None and args.initrd is None and initrd_at is None:
        raise UserError("--initrd-size needs --initrd-at (or an 'Initrd:' line in --from-log)")
    if initrd is not None and initrd_at is None:
        raise UserError("--initrd needs --initrd-at (or an 'Initrd:' line in --from-log)")
    dtb = _file(args.dtb, "dtb") if args.dtb else None
    deadline = getattr(args, "decompress_deadline", None)
    if deadline is not None and not deadline > 0:
        raise UserError(f"--decompress-deadline {deadline}: give a positive number of seconds")
    if dtb_at is None:  # --from-log without a DT line: there is nowhere to put the DTB
        raise UserError(f"{args.from_log}: the log needs a DT line (the DTB's address) to replay")
    return ReplayRequest(
        machine=m,
        ram=ram,
        out=out,
        kernel=kernel,
        kernel_at=kernel_at,
        dtb_at=dtb_at,
        initrd_at=initrd_at,
        initrd=initrd,
        initrd_size=parse_size(size, "--initrd-size") if size is not None and initrd is None else None,
        log_initrd_size=log_initrd_size,
        seed=getattr(args, "seed", 1),
        dtb=dtb,
        until=getattr(args, "until", None),
        decompress_deadline=deadline,
        halt_check=not getattr(args, "no_halt_check", False),
        memory_start=memory_start,
        kernel_version=_debian_kernel_version() if debian else None,
    )


def handler(args: argparse.Namespace) -> int:
    result = replay(request_from_args(args))
    print(f"{result['verdict']} ({result['phase']}) in {result['timings']['replay']:.1f}s on {result['machine']}")
    for role, p in result["placement"].items():
        print(f"  {role:6} [{p['address']:#x}, {p['address'] + p['size']:#x})")
    for c in result["observed"]["clobbered"]:
        print(f"  clobbered {c['label']}")
    print(f"  oracle agrees: {result['oracle_agrees']}")
    if result["stage2"]:
        stage2 = result["stage2"]
        print(f"  stage 2: payload sha256 {stage2['payload_sha256'][:16]}..., cmdline {stage2['cmdline']!r}")
    for line in result["reasons"]:
        print(f"  - {line}")
    json.dump({"out": str(Path(result["observed"]["dumps"]).parent)}, sys.stdout)
    print()
    return {"pass": 0, "fail": 1}.get(result["verdict"], 2)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "replay",
        help="replay a placement of zImage/initrd/DTB in QEMU (no stage 1) "
        "and diff every segment at zImage and kernel entry",
    )
    p.add_argument("--machine", required=True, help="machine profile")
    p.add_argument("--ram", help="RAM size (default: the machine's default)")
    p.add_argument("--kernel", default="debian", help="zImage: 'debian' or a path")
    p.add_argument("--initrd", help="initrd file (default with --from-log: a stage-2 initrd of the log's size)")
    p.add_argument("--initrd-size", help="generate a stage-2 initrd with a payload of this size (e.g. 1M)")
    p.add_argument("--seed", type=int, default=1, help="payload seed of a generated initrd (default 1)")
    p.add_argument("--dtb", help="DTB file (default: the machine's); /chosen gets bootargs and initrd")
    p.add_argument("--kernel-at", help="zImage address: 0x... absolute or +offset from RAM base")
    p.add_argument("--initrd-at", help="initrd address")
    p.add_argument("--dtb-at", help="DTB address")
    p.add_argument(
        "--memory-start",
        help="the DTB's /memory starts here (absolute or +offset), e.g. +0xC000000 for RAM off a 128 MiB boundary",
    )
    p.add_argument("--from-log", help="take the addresses from a kexec --debug log, relative to its RAM base")
    p.add_argument(
        "--attempt",
        type=int,
        help="with --from-log: which kexec attempt of the log (1-based, as `testbench analyze` numbers them; "
        "default the first with MEMORY RANGES, Kernel: and DT lines)",
    )
    p.add_argument(
        "--until",
        choices=UNTIL,
        help="init: boot on to the stage-2 marker and check payload, DTB and cmdline (default with a "
        "generated initrd); kernel-entry: judge the layout at the kernel entry (default otherwise)",
    )
    p.add_argument(
        "--decompress-deadline",
        type=float,
        help=f"seconds to wait for the kernel entry, before TESTBENCH_TIMEOUT_FACTOR "
        f"(default {STOP_DEADLINES['decompress']:.0f})",
    )
    p.add_argument(
        "--no-halt-check",
        action="store_true",
        help="wait out the deadline even when the CPU is found halted in a branch-to-self",
    )
    p.add_argument("--out", help="artifact dir (default out/replay-<machine>-<time>)")
    p.set_defaults(func=handler)
