"""Files written atomically (temporary name, fsync, rename), output paths checked before the work,
stale temporary files cleaned, and file digests: used by every layer.

Temporary files are named `<final name>.tmp<pid>`, so `clean_stale_tmp` can tell the leftovers of
a killed process (its pid is gone) from those of a live one.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
from pathlib import Path

from fasttin.errors import UserError

_TMP = re.compile(r"\.tmp(\d+)(\.[A-Za-z0-9]+)?$")


class OutputError(UserError, OSError):
    """An output that cannot be written (read-only, full disk, missing parent, not a folder...)."""


def why(e: OSError) -> str:
    """An OSError in a few words for a one-line message (no errno numbers, no traceback)."""
    if e.errno == errno.ENOSPC:
        return "no space left on the device"
    if e.errno == errno.EDQUOT:
        return "disk quota exceeded"
    return e.strerror or type(e).__name__


def tmp_name(path: Path) -> Path:
    return path.with_name(path.name + f".tmp{os.getpid()}")


def write_atomic(path: Path, data: bytes) -> None:
    """`data` at `path`, all or nothing: a failure (full disk, say) removes the temporary file,
    leaves any earlier `path` untouched and raises an OutputError that names `path`."""
    path = Path(path)
    tmp = tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):  # the temporary may never have been created
            tmp.unlink()
        raise OutputError(f"cannot write {path}: {why(e)}") from None


def write_json_atomic(path: Path, obj) -> None:
    write_atomic(path, (json.dumps(obj, indent=1) + "\n").encode())


def ensure_writable(path: Path, *, folder: bool = False) -> None:
    """Fail early, before any work, if `path` (a file, or a folder with folder=True) cannot be
    written: creates missing parent folders and probes with a temporary file it removes again."""
    path = Path(path)
    where = path if folder else path.parent
    if not folder and path.is_dir():
        raise OutputError(f"cannot write {path}: it is a folder")
    if folder and path.exists() and not path.is_dir():
        raise OutputError(f"cannot write into {path}: it is a file, not a folder")
    existing = next(p for p in (where, *where.parents) if p.exists())
    if not existing.is_dir():
        raise OutputError(f"cannot write {path}: {existing} is a file, not a folder")
    try:
        where.mkdir(parents=True, exist_ok=True)
        probe = tmp_name(where / ".fasttin-write-probe")
        with open(probe, "wb") as f:
            f.write(b"\0")
        probe.unlink()
    except OSError as e:
        raise OutputError(f"cannot write {path}: {why(e)}") from None


def alive(pid: int) -> bool:
    """Whether process `pid` still runs (a leftover of a dead one may be removed)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_tmp(folder: Path) -> list[Path]:
    """Remove the temporary files (`*.tmp<pid>[.ext]`) in `folder` whose process no longer runs:
    what a killed or failed save left behind. Returns what it removed."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = _TMP.search(p.name)
        if m and p.is_file() and int(m.group(1)) != os.getpid() and not alive(int(m.group(1))):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def digest(path: Path, algorithm: str = "sha256") -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()
