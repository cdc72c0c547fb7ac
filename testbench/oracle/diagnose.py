"""Why an attempt never loaded, or what went wrong around a load that did: a diagnosis, not an error.

Each rule reads what one attempt printed (testbench.inputs.attempts.Attempt) and names a known cause:
  option-clash       kexec-tools 2.0.17-2.0.20 on ARM: --command-line/--append share the short option 'a'
                     with --kexec-syscall-auto (20fea93), so the kexec_file_load path runs: it reads no
                     memory ranges, hands zImage_arm_load another buffer ("zImage header: 0x00000000
                     0x00007c10 0x00001000" in a reproduction) and its first locate_hole fails ("Could not
                     find a free area of memory of <zImage requires + 0x8000> bytes"). Fixed in 2.0.21
                     (74c7c36). The A80 thread's second attempt.
  not-a-zimage       the header's magic is not 0x016f2818: the file is not a zImage, or is corrupt. kexec's
                     ARM probe accepts any file, so such a file may even load; the decompressor never runs.
  no-memory-ranges   kexec found no System RAM in /proc/iomem, so nothing could be placed.
  file-load-refused  `kexec -s` (kexec_file_load only): 32-bit ARM kernels never offer CONFIG_KEXEC_FILE;
                     syscall 401 is only reserved. "syscall kexec_file_load not available." and nothing more.
  file-load-fallback the same message, then a normal kexec_load run (2.0.17-2.0.20 with 'a'): harmless.
  kexec-load-refused the running kernel refused the kexec_load syscall; the plan printed is still judged.
  load-failed        another of kexec's own error lines ("Cannot determine the file type", "Invalid FDT
                     buffer", "zImage is truncated").
  cut-short          no plan and no error: the paste stops before kexec placed anything.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..inputs.attempts import ZIMAGE_MAGIC, Attempt
from .placement import OPTION_CLASH, in_releases, version_tuple

_FREE_AREA = re.compile(r"Could not find a free area of memory of (0x[0-9a-fA-F]+) bytes")
_ERRNO_HINTS = {
    "Function not implemented": "the running kernel has no kexec support (built without CONFIG_KEXEC)",
    "Invalid argument": (
        "the kernel rejected the segments or the CPU state; on an SMP board the first kernel may need "
        "nr_cpus=1 (seen on vexpress-a15 in QEMU)"
    ),
    "Operation not permitted": "kexec_load needs root (CAP_SYS_BOOT), or kexec is disabled (kexec_load_disabled)",
    "Device or resource busy": "a kernel is already loaded or being loaded: `kexec -u` first",
}


@dataclass(frozen=True)
class Diagnosis:
    kind: str  # one of the module docstring's names
    summary: str
    evidence: tuple[str, ...] = ()
    advice: tuple[str, ...] = ()
    blocks_load: bool = True  # False: the attempt loaded (or planned) anyway; it is still judged

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "summary": self.summary,
            "evidence": list(self.evidence),
            "advice": list(self.advice),
            "blocks_load": self.blocks_load,
        }


def _failure(a: Attempt, prefix: str) -> str | None:
    return next((f.text for f in a.failures if f.text.startswith(prefix)), None)


def _version_words(a: Attempt) -> str:
    if a.kexec_version is None:
        return "kexec-tools version not known"
    source = "named in the text" if a.kexec_version_source == "text" else f"from {a.kexec_version_source}"
    return f"kexec-tools {a.kexec_version} ({source})"


def _clash(a: Attempt) -> Diagnosis | None:
    log = a.log
    if version_tuple(a.kexec_version) is not None and not in_releases(a.kexec_version, OPTION_CLASH):
        return None  # a known version without the clash: the rules below say what else it is
    free = _failure(a, "Could not find a free area of memory of")
    bad_magic = log.header is not None and log.header[0] != ZIMAGE_MAGIC
    if log.memory_ranges or a.run.kexec_load_path or a.placed or not (free or bad_magic):
        return None
    evidence = [_version_words(a), "no MEMORY RANGES: the kexec_file_load path never reads /proc/iomem"]
    if bad_magic and log.header is not None:
        words = " ".join(f"{w:#010x}" for w in log.header)
        evidence.append(
            f"zImage header: {words}: the magic is not {ZIMAGE_MAGIC:#010x} because that path hands "
            "zImage_arm_load another buffer than the file (not a corrupt zImage)"
        )
    if free:
        m = _FREE_AREA.search(free)
        need = int(m.group(1), 16) if m else None
        if need is not None and log.zimage_requires is not None and need == log.zimage_requires + 0x8000:
            evidence.append(f"'{free}': zImage requires {log.zimage_requires:#x} + 0x8000, the kernel's own hole")
        else:
            evidence.append(f"'{free}'")
    if a.command is not None:
        has = {"--command-line", "--append"} & set(a.command.options)
        evidence.append(
            f"the command shown before it (line {a.command.line}) "
            + (f"has {', '.join(sorted(has))}" if has else "has no --command-line/--append: is it the one that ran?")
        )
    return Diagnosis(
        "option-clash",
        "kexec-tools 2.0.17-2.0.20 option clash on ARM: --command-line/--append share the short option 'a' "
        "with --kexec-syscall-auto, so kexec took the kexec_file_load path, which finds no memory to place "
        "the zImage in",
        tuple(evidence),
        (
            "upgrade kexec-tools to 2.0.21 or later (74c7c36 'arm: redefine OPT_APPEND and OPT_RAMDISK')",
            "or leave out --command-line/--append and put the bootargs in the DTB's /chosen "
            "(adding -c/--kexec-syscall does not help: 'a' is handled after it)",
        ),
    )


def _not_a_zimage(a: Attempt) -> Diagnosis | None:
    h = a.log.header
    if h is None or h[0] == ZIMAGE_MAGIC:
        return None
    words = " ".join(f"{w:#010x}" for w in h)
    loaded = a.placed
    return Diagnosis(
        "not-a-zimage",
        f"the file kexec read is not a zImage, or is corrupt: its header magic is {h[0]:#010x}, "
        f"a zImage has {ZIMAGE_MAGIC:#010x} at offset 0x24"
        + ("; kexec loaded it anyway (its ARM probe accepts any file), but no decompressor will run" if loaded else ""),
        (f"zImage header: {words}", _version_words(a)),
        ("check the file: arch/arm/boot/zImage, not Image, vmlinux or a uImage; compare its size and sha256",),
        blocks_load=not loaded,
    )


def _no_ranges(a: Attempt) -> Diagnosis | None:
    if a.log.memory_ranges or a.placed or not a.failures:
        return None
    heading = "MEMORY RANGES printed with no System RAM under it" if a.run.memory_ranges_heading else "no MEMORY RANGES"
    return Diagnosis(
        "no-memory-ranges",
        "kexec found no System RAM to place the zImage in",
        (heading, *(f"'{f.text}'" for f in a.failures)),
        ("check that /proc/iomem lists 'System RAM' and that --mem-min/--mem-max leave some",),
    )


def _file_load(a: Attempt) -> Diagnosis | None:
    if not a.run.file_load_unavailable:
        return None
    if a.placed or a.run.kexec_load_path:
        return Diagnosis(
            "file-load-fallback",
            "kexec_file_load was tried first and is not available on 32-bit ARM; kexec fell back to kexec_load",
            (
                "syscall kexec_file_load not available.",
                "in 2.0.17-2.0.20 --command-line/--append switch on --kexec-syscall-auto, which does this",
            ),
            (),
            blocks_load=False,
        )
    return Diagnosis(
        "file-load-refused",
        "kexec_file_load is not available on 32-bit ARM (CONFIG_KEXEC_FILE is never offered there; syscall "
        "401 is only reserved), and kexec was told to use it alone (-s / --kexec-file-syscall)",
        ("syscall kexec_file_load not available.", _version_words(a)),
        ("drop -s (the default, or -c / --kexec-syscall, uses kexec_load)",),
    )


def _kexec_load_refused(a: Attempt) -> Diagnosis | None:
    text = _failure(a, "kexec_load failed:")
    if text is None:
        return None
    errno = text.split(":", 1)[1].strip()
    hint = _ERRNO_HINTS.get(errno, "the running kernel refused the segments kexec planned")
    return Diagnosis(
        "kexec-load-refused",
        f"the running kernel refused kexec_load ({errno}): {hint}; the plan kexec printed is still judged",
        (f"'{text}'",),
        (),
        blocks_load=False,
    )


def _other_failure(a: Attempt) -> Diagnosis | None:
    if a.placed or not a.failures:
        return None
    first = a.failures[0].text
    advice = {
        "Cannot determine the file type": "the kernel file is not one kexec knows (a zImage, uImage)",
        "Invalid FDT buffer": "the --dtb file is not a flattened device tree",
        "zImage is truncated": "the file is shorter than its header says: copy it again",
        "Cannot open": "a file on the command line is missing",
        "Cannot read": "a file on the command line cannot be read",
        "Failed to open file": "a file on the command line is missing",
    }
    tip = next((v for k, v in advice.items() if first.startswith(k)), "see kexec's error lines")
    return Diagnosis(
        "load-failed", f"kexec stopped before placing anything: {first}", tuple(f.text for f in a.failures), (tip,)
    )


def diagnose(a: Attempt) -> tuple[Diagnosis, ...]:
    """Every diagnosis that applies, the one that kept it from loading (if any) first."""
    found: list[Diagnosis] = []
    clash = _clash(a)
    if clash is not None:
        found.append(clash)  # its bad magic is part of the clash, not a second finding
    else:
        found += [d for d in (_not_a_zimage(a), _no_ranges(a)) if d is not None]
    found += [d for d in (_file_load(a), _kexec_load_refused(a)) if d is not None]
    if not any(d.blocks_load for d in found) and not a.placed:
        other = _other_failure(a)
        found.append(
            other
            if other is not None
            else Diagnosis(
                "cut-short",
                "the paste shows no plan for this attempt (no 'Kernel:' line, no entry, no segments) and no "
                "error from kexec: it stops before kexec placed anything",
                (),
                ("paste kexec's whole --debug output, through its segment list",),
            )
        )
    found.sort(key=lambda d: not d.blocks_load)
    return tuple(found)


def load_diagnoses(version: str | None, command: str, output: str) -> tuple[str, ...]:
    """A case's failed `kexec -l`, read like a pasted attempt: the diagnoses' summaries and advice, first."""
    from ..inputs.attempts import split_attempts
    from ..inputs.kexeclog import KexecLogError

    text = (f"kexec-tools {version}\n" if version else "") + f"# {command}\n{output}"
    try:
        attempts = split_attempts(text).attempts
    except (KexecLogError, ValueError):
        return ()
    found = [d for a in attempts for d in diagnose(a)]
    return tuple(f"diagnosis ({d.kind}): {d.summary}" + (f"; {d.advice[0]}" if d.advice else "") for d in found)
