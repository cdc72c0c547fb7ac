"""testbench: QEMU testbench for 32-bit ARM kexec placement."""
