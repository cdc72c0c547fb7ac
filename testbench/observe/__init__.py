"""Ground truth from the emulator: stop at the zImage entry and at the kernel entry, dump every segment.

One stage per module, in the order of a run:
  plan.py         where to stop and what to dump (`make_plan` -> `Plan`)
  observer.py     the live stops through the gdbstub (`Observer`)
  evidence.py     what the dumps show: diffs, load fidelity, the dumps kept
  postmortem.py   a stop that never came (`Hang`, `hang_reasons`)
  observation.py  the typed result (`Observation`)
  stage2.py       the stage-2 watch and the one end of a run (`finish_run`), for `run` and `replay`
  dtbprobe.py     the DTB kexec loaded against the plan (fdtget)

This file imports nothing: `verdict` reads `observation` without pulling in the live half.
"""
