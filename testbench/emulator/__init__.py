"""The emulator: QEMU and its sockets, the console, the stage-1 shell, the gdb stub, snapshots."""
