"""What the tests share: running a command as a user does, waiting for an event (never a fixed
sleep), a folder's contents, a run's progress, and the one way to assert a one-line error."""
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# A command's time limit only guards CI against a hang; it is never what a test measures. Generous,
# because a loaded machine runs the suite several times slower (FASTTIN_TEST_TIMEOUT overrides).
CLI_TIMEOUT = float(os.environ.get("FASTTIN_TEST_TIMEOUT", 1200))


def run_cli(*args, timeout=CLI_TIMEOUT, env=None):
    """Run `python -m ...` as a user would; returns CompletedProcess with text output."""
    return subprocess.run([sys.executable, "-m", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})})


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]  # rendezvous on a free port


def wait_for(pred, proc=None, timeout=CLI_TIMEOUT, what="the event"):
    """Poll `pred` until it holds. Fails at once if `proc` exits first; `timeout` only guards
    against a hang (generous: CI may be loaded), it is never what the test waits for."""
    deadline = time.monotonic() + timeout
    while not pred():
        if proc is not None and proc.poll() is not None:
            if pred():
                return
            raise AssertionError(f"the process exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout} s")
        time.sleep(0.01)


class Lines:
    """Collects a running process's stderr (or stdout) line by line in a thread, so a test can wait
    for a log line instead of sleeping: `Lines(proc.stderr).wait("epoch 1", proc)`."""

    def __init__(self, stream):
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream):
        for line in stream:
            self.lines.append(line)

    def seen(self, needle: str) -> bool:
        return any(needle in line for line in self.lines)

    def wait(self, needle: str, proc=None, timeout=CLI_TIMEOUT) -> None:
        wait_for(lambda: self.seen(needle), proc, timeout, what=f"line containing {needle!r}")

    def text(self) -> str:
        self._thread.join(timeout=60)
        return "".join(self.lines)


def snapshot(folder) -> dict:
    """Every file under `folder` (relative path -> bytes): any change shows. A run folder's .lock is
    left out: it is the claim of whichever trainer last opened the folder, not the run's content."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def progress(out) -> dict:
    """RUN_DIR/progress.json (rank 0 writes it at each logging step), or {} before the first."""
    try:
        return json.loads((Path(out) / "progress.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def error_line(stderr: str, *culprits: str, alone: bool = True, prefix: str = "") -> str:
    """The one error line of a failed command: no traceback; the only line on stderr (or, with
    alone=False, its last, after a run's log lines); starting with `prefix`; naming every culprit."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    if alone:
        assert len(lines) == 1, stderr[-3000:]
    line = lines[-1]
    assert line.startswith(prefix), line
    for c in culprits:
        assert c in line, (c, line)
    return line


def refused(r, code: int, *culprits: str, alone: bool = True, prefix: str = "") -> str:
    """A finished command (CompletedProcess) that exited with `code` and said why in one line."""
    assert r.returncode == code, r.stderr[-3000:]
    return error_line(r.stderr, *culprits, alone=alone, prefix=prefix)


# `python -c STOP_AT_SHARD NAME args...`: fasttin.pack that stops itself (SIGSTOP) as it opens shard NAME,
# so a test can kill it at that point of the build, not at a moment
STOP_AT_SHARD = """
import os, signal, sys
from fasttin import shards
from fasttin.pack import main
_open = shards.ShardWriter._open
def _open_then_stop(self):
    _open(self)
    if self._name == sys.argv[1]:
        os.kill(os.getpid(), signal.SIGSTOP)  # the test kills it here: a point, not a moment
shards.ShardWriter._open = _open_then_stop
sys.exit(main(sys.argv[2:]))
"""


def stopped(pid):
    return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "T"
