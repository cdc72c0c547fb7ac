"""The bench's two modes (DESIGN "Modes"), as data the front ends can read without importing a case.

kexec: `kexec -l`, then `kexec -e`. kdump: `kexec -p` into stage 1's crashkernel= reservation, then a panic
(testbench/kdump.py). The crash kernel comes up on one CPU with its devices reset, as kexec-tools' kdump
howto asks.
"""

MODES = ("kexec", "kdump")
CRASH_KERNEL_ARGS = ("maxcpus=1", "reset_devices")
CRASHKERNEL_DEFAULT = "64M"
