"""What a command reports as one line (no traceback), and the exit codes every command shares.

A `UserError` is something the user or the environment caused: a bad flag, a bad or damaged file,
a missing device, a full or read-only disk. Each command's `main` catches `UserError` alone, prints
`prog: error: message` and exits with `EXIT_BAD_INPUT`; anything else is a bug in fasttin and keeps
its traceback.
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED_CHECK = 1  # a check that ran and failed (pack --verify, gpu_checks)
EXIT_BAD_INPUT = 2  # bad flags, bad or damaged input, unwritable output: nothing was lost
EXIT_NONFINITE = 3  # training stopped on a NaN/inf loss or weights; the last good checkpoint is kept
EXIT_INTERRUPTED = 130  # SIGINT/SIGTERM: the position was saved (train) or nothing complete-looking left


class UserError(Exception):
    """A problem with the input or the environment, reported as one line naming the culprit."""
