"""`testbench analyze` and `testbench advise`: the static oracle on the command line.

`analyze` reads a paste as attempts (testbench.inputs.attempts), judges each (testbench.oracle.judge) and
prints one verdict per attempt, then the overall one: the worst judged attempt's.

Exit codes
  analyze: the overall verdict decides: 0 safe (benign overlaps allowed), 1 collision (a fatal one in
           some attempt), 3 unknown (no collision, but a missing input decides some attempt; the output
           names it and the option that gives it), 4 not loaded (no attempt got as far as a placement;
           each has a diagnosis). Attempts that never loaded do not count while another was judged.
  advise:  0 advice printed, whether an --image-size is needed or not
  both:    bad input, no kexec attempt at all, none with enough to judge, or an impossible request raise
           UserError -> the CLI prints one line, exits 2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import UserError
from .oracle.placement import DEFAULT_VERSION
from .sizes import parse_size

EXIT = {"safe": 0, "collision": 1, "unknown": 3, "not loaded": 4}
QEMU_DTB_SIZE = 0x100000  # QEMU pads the DTB it generates to 1 MiB (/sys/firmware/fdt on virt)


def _required_int(text: str, what: str) -> int:
    value = _int(text, what)
    assert value is not None  # _int returns None only for None
    return value


def _int(text: str | None, what: str) -> int | None:
    if text is None:
        return None
    try:
        return parse_size(text, what)
    except UserError:
        raise UserError(f"{what}: cannot read {text!r} as a number (e.g. 0x8000)") from None


def _read_text(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    try:
        return Path(path).read_text(errors="replace")
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None


def _zimage(path: str | None, args: argparse.Namespace):
    if path is None:
        return None
    from .inputs.images import kernel_path
    from .inputs.zimage import read_zimage

    return read_zimage(kernel_path(path), getattr(args, "decompressor_elf", None), getattr(args, "vmlinux", None))


def _table(pred) -> list[str]:
    rows = [f"{'start':>10} {'end':>10} {'size':>11}  {'region':<22} role"]
    for r in sorted(pred.regions, key=lambda r: (r.start, r.end)):
        if r.role == "ram":
            continue
        rows.append(f"{r.start:#010x} {r.end:#010x} {r.size:#11x}  {r.name:<22} {r.role}")
    return rows


def _prediction_lines(pred, decide: tuple[str, ...] = ()) -> list[str]:
    out = []
    ram = [r for r in pred.regions if r.role == "ram"]
    if ram:
        out.append("RAM: " + ", ".join(f"[{r.start:#x}, {r.end:#x})" for r in ram))
    out += ["", *_table(pred), ""]
    if pred.collisions:
        out.append("collisions:")
        out += [f"  {c.severity:<6} {c.label}  ({c.end - c.start:#x} bytes)" for c in pred.collisions]
    else:
        out.append("collisions: none")
    if pred.assumptions:
        out.append("assumptions:")
        out += [f"  - {a}" for a in pred.assumptions]
    out.append("")
    verdict = pred.verdict
    if verdict == "unknown":
        out.append("verdict: unknown; it depends on:")
        out += [f"  - {u}" for u in (decide or pred.undecided)]
    elif verdict == "safe" and pred.collisions:
        out.append("verdict: safe (only benign overlaps: the unused top of the decompressor's malloc arena)")
    else:
        out.append(f"verdict: {verdict}")
    return out


def _source(value: str | None, source: str | None) -> str:
    if value is None:
        return "unknown"
    return f"{value} ({'named in the text' if source == 'text' else 'from ' + source})" if source else value


def _attempt_lines(v) -> list[str]:
    a, log = v.attempt, v.attempt.log
    out = [f"kexec-tools {_source(a.kexec_version, a.kexec_version_source)}"]
    if a.placed:
        out[0] += f", log format {log.format}"
    if a.command is not None:
        out.append(f"command (line {a.command.line}): {a.command.text}")
    if a.running_kernel:
        out.append(f"running kernel: Linux {a.running_kernel}")
    if a.placed:
        out.append(f"new kernel: Linux {_source(a.kernel_version, a.kernel_version_source)}")
    if a.copy is not None:
        out.append(f"C: line (line {a.copy.line}): {a.copy.text}  [{a.copy_fit}]")
    if a.executed:
        out.append("executed: Bye! after it" + ("" if a.copy or a.messages else ", then nothing the paste shows"))
    out += [f"after Bye! (line {m.line}): {m.text}" for m in a.messages]
    out += [f"kexec error (line {f.line}): {f.text}" for f in a.failures]
    names = (
        ("zImage size", log.zimage_size),
        ("requires", log.zimage_requires),
        ("text+data", log.text_data),
        ("bss", log.bss),
        ("total", log.total),
        ("kernel space", log.kernel_space),
    )
    if any(n is not None for _, n in names):
        out.append("kexec: " + ", ".join(f"{k} {n:#x}" for k, n in names if n is not None))
    for d in v.diagnoses:
        out.append(f"diagnosis ({d.kind}): {d.summary}")
        out += [f"  evidence: {e}" for e in d.evidence]
        out += [f"  advice: {x}" for x in d.advice]
    out += [f"note: {n}" for n in v.notes]
    if v.prediction is not None:
        fam = v.prediction.details.get("kexec_family")
        out.append(f"rules: kexec-tools {fam}")
        out += _prediction_lines(v.prediction, v.decide)
    else:
        out.append(f"verdict: {v.verdict}")
    return out


def _summary(result) -> list[str]:
    rows = [f"  {'#':>2}  {'lines':<9} {'kexec':<9} {'kernel':<10} {'kernel at':<10} {'C:':<3} verdict"]
    for v in result.attempts:
        a = v.attempt
        why = v.diagnoses[0].kind if v.verdict in ("not loaded", "incomplete") and v.diagnoses else ""
        why = why or (", ".join(u.split(":")[0] for u in v.prediction.undecided) if v.prediction else "")
        at = f"{a.log.kernel.address:#x}" if a.log.kernel else "-"
        rows.append(
            f"  {a.index:>2}  {a.lines[0]}-{a.lines[1]:<{8 - len(str(a.lines[0]))}} {a.kexec_version or '?':<9} "
            f"{a.kernel_version or '?':<10} {at:<10} {'yes' if a.copy else '-':<3} {v.verdict}"
            + (f" ({why})" if why else "")
        )
    return rows


def _print_paste(path: str, result) -> None:
    n = len(result.attempts)
    print(f"kexec log: {path}: {n} attempt{'s' if n != 1 else ''}")
    for v in result.attempts:
        a = v.attempt
        print()
        print(f"== attempt {a.index} (lines {a.lines[0]}-{a.lines[1]}): {v.verdict}")
        for line in _attempt_lines(v):
            print(f"   {line}" if line else "")
    if result.unattributed:
        print()
        print("C: lines tied to no attempt (not used):")
        for u in result.unattributed:
            print(f"  line {u.copy.line}: {u.copy.text}: {u.reason}")
    print()
    print("summary:")
    print("\n".join(_summary(result)))
    print()
    print(f"overall verdict: {result.verdict} ({result.reason})")


def _write_svg(path: str | None, pred, title: str) -> None:
    if not path:
        return
    from .report.svg import memory_map_svg

    try:
        Path(path).write_text(memory_map_svg(pred.regions, pred.collisions, title))
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror}") from None


def cmd_analyze(args: argparse.Namespace) -> int:
    from .crash_cli import analyze_crash, is_crash_log, print_crash
    from .inputs.attempts import split_attempts
    from .oracle.judge import Inputs, judge

    zi = _zimage(args.zimage, args)
    appended = ((zi.appended_dtb_size + 7) & ~7,) if zi is not None and zi.appended_dtb_size else ()
    text = _read_text(args.logfile)
    if is_crash_log(text):  # kexec -p: the crash oracle (crash_cli.py)
        return print_crash(analyze_crash(text, zi, args.kernel_version, args.kexec_version), args.json)
    paste = split_attempts(text, appended)
    n = len(paste.attempts)
    if args.attempt is not None and not 1 <= args.attempt <= n:
        raise UserError(f"--attempt {args.attempt}: {args.logfile} holds {n} attempt{'s' if n != 1 else ''} (1-{n})")
    efi = {"yes": True, "no": False}.get(args.efi_stub or "")
    inputs = Inputs(
        zi,
        _int(args.text_offset, "--text-offset"),
        args.kexec_version,
        args.kernel_version,
        _int(args.restart, "--restart"),
        efi,
    )
    result = judge(paste, inputs, args.attempt)
    if result.verdict == "incomplete":
        why = "; ".join(
            f"attempt {v.attempt.index} (lines {v.attempt.lines[0]}-{v.attempt.lines[1]}): "
            + (v.notes[-1] if v.notes else v.diagnoses[0].summary if v.diagnoses else "incomplete")
            for v in result.attempts
        )
        raise UserError(f"nothing to judge in {args.logfile}: {why}")
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        _print_paste(args.logfile, result)
    d = result.deciding
    if d is not None and d.prediction is not None:
        _write_svg(args.svg, d.prediction, f"{Path(args.logfile).name} attempt {d.attempt.index}: {d.verdict}")
    elif args.svg:
        print(f"testbench: no layout to draw in {args.svg}: no attempt was judged", file=sys.stderr)
    return EXIT[result.verdict]


def _ram(args: argparse.Namespace) -> tuple[list[tuple[int, int]], str | None, int | None]:
    """RAM ranges, and the DTB size the machine implies."""
    dtb = None
    if args.machine:
        from .machines import get_machine

        m = get_machine(args.machine)
        size = _int(args.ram_size, "--ram-size") or m.default_ram
        m.check_ram(size)
        base = m.ram_base if args.ram_base is None else _required_int(args.ram_base, "--ram-base")
        return [(base, base + size)], m.name, m.dtb_size
    if args.ram_base is None or args.ram_size is None:
        raise UserError("advise needs --machine, or both --ram-base and --ram-size")
    base, size = _required_int(args.ram_base, "--ram-base"), _required_int(args.ram_size, "--ram-size")
    if size <= 0 or base + size > 1 << 32:
        raise UserError("--ram-base/--ram-size must describe RAM below 4 GiB")
    return [(base, base + size)], None, dtb


def cmd_advise(args: argparse.Namespace) -> int:
    from .oracle import advise

    zi = _zimage(args.kernel, args)
    ram, machine, dtb_default = _ram(args)
    notes = []
    dtb = _int(args.dtb_size, "--dtb-size")
    if dtb is None:
        dtb = dtb_default if dtb_default is not None else QEMU_DTB_SIZE
        notes.append(f"DTB size taken as {dtb:#x} (give --dtb-size for the real one)")
    initrd = _int(args.initrd_size, "--initrd-size") or None
    initrd_file = _initrd_file(args)
    if initrd_file is not None:
        initrd = initrd_file.stat().st_size
    if args.crash:  # the smallest crashkernel= reservation (crash_cli.py)
        return _crash_advice(args, zi, ram[0], initrd, initrd_file, dtb or None)
    a = advise(
        zi,
        ram,
        args.kexec_version,
        initrd,
        dtb or None,
        _int(args.text_offset, "--text-offset"),
        mem_min=_int(args.mem_min, "--mem-min") or 0,
        mem_max=_int(args.mem_max, "--mem-max"),
    )
    if args.json:
        out = {
            "needed": a.needed,
            "image_size": a.image_size,
            "minimum": a.minimum,
            "arithmetic": list(a.arithmetic),
            "default": a.default.to_dict(),
            "advised": a.advised.to_dict(),
            "assumptions": notes,
        }
        print(json.dumps(out, indent=2))
        return 0
    where = machine or f"RAM [{ram[0][0]:#x}, {ram[0][1]:#x})"
    print(f"{args.kernel} on {where}, kexec-tools {args.kexec_version}, initrd {initrd or 0:#x}, DTB {dtb:#x}")
    for n in notes + list(a.default.assumptions):
        print(f"  assumption: {n}")
    print()
    for line in a.arithmetic:
        print(line)
    print()
    if a.needed:
        print(f"advice: --image-size={a.image_size:#x}")
    else:
        print("advice: no --image-size needed")
    return 0


def _initrd_file(args: argparse.Namespace) -> Path | None:
    if not getattr(args, "initrd", None):
        return None
    path = Path(args.initrd)
    if not path.is_file():
        raise UserError(f"--initrd {path}: no such file")
    return path


def _crash_advice(
    args: argparse.Namespace, zi, ram: tuple[int, int], initrd: int | None, initrd_file: Path | None, dtb: int | None
) -> int:
    from .crash_cli import ALIGNED_BASE, crash_advise, print_crash_advice

    start = _int(args.crash_base, "--crash-base")
    if start is None:  # crashkernel=SIZE: any 128 MiB boundary gives the same answer
        start = (ram[0] + ALIGNED_BASE) & -ALIGNED_BASE
    if not ram[0] <= start < ram[1]:
        raise UserError(f"--crash-base {start:#x} is not in RAM [{ram[0]:#x}, {ram[1]:#x})")
    if args.measure:
        from .crash_measure import run_measurement

        return run_measurement(args, zi, ram, start, dtb, fixed_base=args.crash_base is not None)
    from .crash_measure import crash_runtime
    from .inputs.images import kernel_path

    cma = parse_size(args.cma, "--cma") if args.cma else None
    runtime = crash_runtime(args.kernel, kernel_path(args.kernel), args.machine, initrd_file, initrd, cma)
    version = args.kernel_version or "6.1"
    a = crash_advise(zi, ram, start, args.kexec_version, version, initrd, dtb, runtime)
    if not args.kernel_version and not args.json:
        print("assumption: the crash kernel is Linux >= 5.16 (give --kernel-version)")
    return print_crash_advice(a, args.json, fixed_base=args.crash_base is not None)


def register(subparsers) -> None:
    an = subparsers.add_parser("analyze", help="reconstruct a kexec load from its --debug log and judge it")
    an.add_argument("logfile", help="text holding `kexec --debug` output ('-' for stdin)")
    an.add_argument("--zimage", help="the zImage that was loaded (fills what the log lacks)")
    an.add_argument("--decompressor-elf", help="arch/arm/boot/compressed/vmlinux, for exact constants")
    an.add_argument("--vmlinux", help="the kernel vmlinux, for exact TEXT_OFFSET and sizes")
    an.add_argument("--text-offset", help="the kernel's TEXT_OFFSET, e.g. 0x8000")
    an.add_argument("--kexec-version", help="kexec-tools version that printed the log, e.g. 2.0.18")
    an.add_argument(
        "--kernel-version", help="the loaded kernel's version, e.g. 5.6.0 (default: its banner or file name in the log)"
    )
    an.add_argument("--restart", help="the decompressor's restart offset (decides an unknown that hinges on it)")
    an.add_argument("--efi-stub", choices=("yes", "no"), help="the zImage has an EFI stub (restart ~0x10a0) or not")
    an.add_argument("--attempt", type=int, help="judge only this attempt (1-based, as numbered in the output)")
    an.add_argument("--json", action="store_true", help="print JSON instead of the table")
    an.add_argument("--svg", help="write the memory map to this SVG file")
    an.set_defaults(func=cmd_analyze)

    ad = subparsers.add_parser("advise", help="smallest kexec --image-size that keeps initrd and DTB intact")
    ad.add_argument(
        "--kernel", required=True, help="the zImage to load: a path, or 'debian' for the cached Debian kernel"
    )
    ad.add_argument("--machine", help="machine profile (RAM base and default size)")
    ad.add_argument("--ram-base", help="RAM base address (instead of, or overriding, --machine)")
    ad.add_argument("--ram-size", help="RAM size, e.g. 1G (default: the machine's default RAM)")
    ad.add_argument("--initrd-size", help="initrd size, e.g. 1M (default: no initrd)")
    ad.add_argument("--dtb-size", help="DTB size after kexec's additions (default: 1M for QEMU's own DTB)")
    ad.add_argument("--kexec-version", default=DEFAULT_VERSION, help=f"kexec-tools version (default {DEFAULT_VERSION})")
    ad.add_argument("--text-offset", help="TEXT_OFFSET when the zImage's tag lacks it")
    ad.add_argument("--mem-min", help="kexec's --mem-min: the lowest address it may load to")
    ad.add_argument("--mem-max", help="kexec's --mem-max: the highest address it may load to")
    ad.add_argument("--decompressor-elf", help="arch/arm/boot/compressed/vmlinux, for exact constants")
    ad.add_argument("--vmlinux", help="the kernel vmlinux, for exact TEXT_OFFSET and sizes")
    ad.add_argument("--json", action="store_true", help="print JSON")
    ad.add_argument("--crash", action="store_true", help="kexec -p: the smallest crashkernel= size and --image-size")
    ad.add_argument("--crash-base", help="with --crash: the reservation's start (crashkernel=SIZE@ADDR)")
    ad.add_argument("--initrd", help="the initrd file (its size, and with --crash what its initramfs unpacks to)")
    ad.add_argument("--cma", help="with --crash: the crash kernel's CMA area (default: the Debian package config)")
    ad.add_argument(
        "--measure",
        action="store_true",
        help="with --crash: run kdump cases in QEMU for the smallest size that reaches init and store the "
        "build's boot memory (--initrd-size is then the payload of the bench's own initrd)",
    )
    ad.add_argument("--out", help="with --measure: keep every run's artifacts here")
    ad.add_argument("--kernel-version", help="with --crash: the crash kernel's Linux version (5.16 changed it)")
    ad.set_defaults(func=cmd_advise)
