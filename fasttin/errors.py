"""What a command reports as one line (no traceback), the exit codes every command shares, and the
one wrapper every command's `main` goes through.

A `UserError` is something the user or the environment caused: a bad flag, a bad or damaged file,
a missing device, a full or read-only disk. `run_command` turns any `Reported` failure (a
UserError, or a training run that stopped on a non-finite loss) into `name: error: message` and
its exit code; anything else is a bug in fasttin, or a real out-of-memory, and keeps its traceback.
"""
from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable

EXIT_OK = 0
EXIT_FAILED_CHECK = 1  # a check that ran and failed (pack --verify, gpu_checks)
EXIT_BAD_INPUT = 2  # bad flags, bad or damaged input, unwritable output: nothing was lost
EXIT_NONFINITE = 3  # training stopped on a NaN/inf loss or weights; the last good checkpoint is kept
EXIT_INTERRUPTED = 130  # SIGINT/SIGTERM: the position was saved (train) or nothing complete-looking left


def shown(name: str) -> str:
    """A name read from a file, safe in a one-line message (repr-quoted when it holds control characters)."""
    return name if name.isprintable() else repr(name)


def shown_text(text: str) -> str:
    """Free text read from a file with each non-printable character (ESC, newline...) as its repr-escape."""
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class Reported(Exception):
    """A failure that a command reports as one line, `name: <word>: message`, with its exit code."""

    exit_code = EXIT_FAILED_CHECK
    word = "error"


class UserError(Reported):
    """A problem with the input or the environment, reported as one line naming the culprit."""

    exit_code = EXIT_BAD_INPUT


def run_command(name: str, body: Callable[[], int], interrupted: str = "") -> int:
    """body()'s exit code; a Reported failure becomes one line on stderr and its own exit code, and
    Ctrl-C (KeyboardInterrupt) the line `name: interrupted` (with what `interrupted` says was kept)
    and EXIT_INTERRUPTED."""
    try:
        return body()
    except Reported as e:
        print(f"{name}: {e.word}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:  # a command may say what it kept: KeyboardInterrupt("...")
        kept = str(e) or interrupted
        print(f"{name}: interrupted" + (f"; {kept}" if kept else ""), file=sys.stderr)
        return EXIT_INTERRUPTED


def interrupt_on_sigterm() -> None:
    """SIGTERM (kill, timeout, Slurm) stops a command as Ctrl-C does: it cleans up and says so."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupt)


class CommandParser(argparse.ArgumentParser):
    """argparse for the command `python -m name`, with its errors as one line (the culprit named,
    the same `name: error:` prefix as every other error of the command) and exit status 2."""

    def __init__(self, name: str, **kw):
        super().__init__(prog=f"python -m {name}", **kw)
        self.name = name

    def error(self, message):
        self.exit(EXIT_BAD_INPUT, f"{self.name}: error: {message} (--help lists the flags)\n")
