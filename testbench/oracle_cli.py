"""`testbench analyze` and `testbench advise`: the static oracle on the command line.

Exit codes
  analyze: 0 safe (benign overlaps allowed), 1 collision (a fatal one), 3 unknown (a missing input
           decides it; the output names it)
  advise:  0 advice printed, whether an --image-size is needed or not
  both:    bad input or an impossible request raise UserError -> the CLI prints one line, exits 2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import UserError
from .oracle.placement import DEFAULT_VERSION
from .sizes import parse_size

EXIT = {"safe": 0, "collision": 1, "unknown": 3}
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


def _print_prediction(pred, header: list[str]) -> None:
    for line in header:
        print(line)
    ram = [r for r in pred.regions if r.role == "ram"]
    if ram:
        print("RAM: " + ", ".join(f"[{r.start:#x}, {r.end:#x})" for r in ram))
    print()
    print("\n".join(_table(pred)))
    print()
    if pred.collisions:
        print("collisions:")
        for c in pred.collisions:
            print(f"  {c.severity:<6} {c.label}  ({c.end - c.start:#x} bytes)")
    else:
        print("collisions: none")
    if pred.assumptions:
        print("assumptions:")
        for a in pred.assumptions:
            print(f"  - {a}")
    print()
    verdict = pred.verdict
    if verdict == "unknown":
        print("verdict: unknown; it depends on:")
        for u in pred.undecided:
            print(f"  - {u}")
    elif verdict == "safe" and pred.collisions:
        print("verdict: safe (only benign overlaps: the unused top of the decompressor's malloc arena)")
    else:
        print(f"verdict: {verdict}")


def _write_svg(path: str | None, pred, title: str) -> None:
    if not path:
        return
    from .report.svg import memory_map_svg

    try:
        Path(path).write_text(memory_map_svg(pred.regions, pred.collisions, title))
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror}") from None


def cmd_analyze(args: argparse.Namespace) -> int:
    from .inputs.kexeclog import parse_kexec_log
    from .oracle import analyze

    log = parse_kexec_log(_read_text(args.logfile))
    zi = _zimage(args.zimage, args)
    pred = analyze(log, zi, _int(args.text_offset, "--text-offset"), args.kexec_version)
    if args.json:
        print(json.dumps(pred.to_dict(), indent=2))
    else:
        fam = pred.details.get("kexec_family")
        head = [f"kexec log: {args.logfile} (format {log.format}, rules {fam})"]
        names = (
            ("zImage size", "zimage_size"),
            ("requires", "zimage_requires"),
            ("text+data", "text_data"),
            ("bss", "bss"),
            ("total", "total"),
            ("kernel space", "kernel_space"),
        )
        seen = [(n, getattr(log, f)) for n, f in names]
        if any(v is not None for _, v in seen):
            head.append("kexec: " + ", ".join(f"{n} {v:#x}" for n, v in seen if v is not None))
        _print_prediction(pred, head)
    _write_svg(args.svg, pred, f"{Path(args.logfile).name}: {pred.verdict}")
    return EXIT[pred.verdict]


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
    a = advise(zi, ram, args.kexec_version, initrd, dtb or None, _int(args.text_offset, "--text-offset"))
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


def register(subparsers) -> None:
    an = subparsers.add_parser("analyze", help="reconstruct a kexec load from its --debug log and judge it")
    an.add_argument("logfile", help="text holding `kexec --debug` output ('-' for stdin)")
    an.add_argument("--zimage", help="the zImage that was loaded (fills what the log lacks)")
    an.add_argument("--decompressor-elf", help="arch/arm/boot/compressed/vmlinux, for exact constants")
    an.add_argument("--vmlinux", help="the kernel vmlinux, for exact TEXT_OFFSET and sizes")
    an.add_argument("--text-offset", help="the kernel's TEXT_OFFSET, e.g. 0x8000")
    an.add_argument("--kexec-version", help="kexec-tools version that printed the log, e.g. 2.0.18")
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
    ad.add_argument("--decompressor-elf", help="arch/arm/boot/compressed/vmlinux, for exact constants")
    ad.add_argument("--vmlinux", help="the kernel vmlinux, for exact TEXT_OFFSET and sizes")
    ad.add_argument("--json", action="store_true", help="print JSON")
    ad.set_defaults(func=cmd_advise)
