"""Static layout oracle: where kexec-tools puts a 32-bit ARM zImage, initrd and DTB, and whether the
zImage decompressor or the early kernel writes over them. Pure functions, no I/O.

Public API (what the CLI and the end-to-end loop call):

    predict(zimage: ZImage, ram_ranges: Sequence[tuple[int, int]], kexec_version: str,
            image_size: int | None = None, initrd_size: int | None = None, dtb_size: int | None = None,
            text_offset: int | None = None) -> Prediction
        kexec-tools' placement for that version, then the footprints and collisions.
    analyze(log: KexecLog, zimage: ZImage | None = None, text_offset: int | None = None,
            kexec_version: str | None = None) -> Prediction
        the same evaluation for an observed `kexec --debug` log (the log's addresses win).
    judge(paste: inputs.attempts.Paste, inputs: Inputs = Inputs(), only: int | None = None) -> PasteVerdict
        analyze for each attempt of a pasted report on its own, a diagnosis for one that never loaded
        (diagnose.py), and the paste's overall verdict (the worst judged attempt's).
    advise(zimage, ram_ranges, kexec_version, initrd_size=None, dtb_size=None, text_offset=None) -> Advice
        the smallest page-aligned --image-size with no overlap at all.
    place(...) -> Placement, locate_hole(...)       kexec-tools' arithmetic alone (placement.py)

Prediction: .verdict ("safe" | "collision" | "unknown"), .collisions (Collision: .a, .b, .start, .end
(exclusive), .severity "fatal" | "benign"), .regions (Region: .name, .start, .end, .role), .assumptions,
.undecided (which missing input would decide an "unknown"), .placement, .to_dict().
"safe" allows benign collisions: overlaps only in the top of the malloc arena, above MALLOC_USED_BOUND
(0x8000) bytes from its bottom, which no decompressor allocates (see collide.py).

All ranges are [start, end) and all addresses physical.
"""

from .advise import Advice, AdviceError, advise
from .analyze import AnalyzeError, analyze, predict
from .collide import MALLOC_USED_BOUND, Collision, Region
from .diagnose import Diagnosis, diagnose
from .judge import AttemptVerdict, Inputs, PasteVerdict, judge
from .placement import DEFAULT_VERSION, FAMILIES, Placement, PlacementError, locate_hole, place, version_family
from .predict import Knowns, Prediction, evaluate

__all__ = [
    "DEFAULT_VERSION",
    "FAMILIES",
    "MALLOC_USED_BOUND",
    "Advice",
    "AdviceError",
    "AnalyzeError",
    "AttemptVerdict",
    "Collision",
    "Diagnosis",
    "Inputs",
    "Knowns",
    "PasteVerdict",
    "Placement",
    "PlacementError",
    "Prediction",
    "Region",
    "advise",
    "analyze",
    "diagnose",
    "evaluate",
    "judge",
    "locate_hole",
    "place",
    "predict",
    "version_family",
]
