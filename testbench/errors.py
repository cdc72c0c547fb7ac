"""Error types shared by every stage.

The CLI turns a UserError into one line on stderr and exit code 2; anything else that escapes is a bench
bug and is reported as `error` with the same exit code, but with its type named so it can be fixed.
"""


class UserError(Exception):
    """Bad input from the user: a missing file, an unknown machine, an impossible size."""


class BenchError(Exception):
    """The bench itself could not do its job (QEMU would not start, the cache is broken, ...)."""
