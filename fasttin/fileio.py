"""Every write and every rename of fasttin: files written atomically (temporary name, fsync,
rename), folders built beside and swapped in, output paths checked before the work, stale
temporaries cleaned, folders claimed by one process at a time, OS errors in a few words, and file
digests.

Temporary files are named `<final name>.tmp<pid>[.suffix]`, so `clean_stale_tmp` can tell the leftovers of
a killed process (its pid is gone) from those of a live one.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

from fasttin.errors import UserError, shown

_TMP = re.compile(r"\.tmp(\d+)(\.[A-Za-z0-9]+)?$")


class OutputError(UserError, OSError):
    """An output that cannot be written (read-only, full disk, missing parent, not a folder...)."""


def cache_folder() -> Path:
    """The one folder fasttin keeps things in that no command names: the official archive's
    download and the CPU probe's figures. FASTTIN_CACHE, else ~/.cache/fasttin."""
    return Path(os.environ.get("FASTTIN_CACHE") or Path.home() / ".cache" / "fasttin")


def os_reason(e: OSError) -> str:
    """An OSError in a few words for a one-line message (no errno numbers, no traceback)."""
    if e.errno == errno.ENOSPC:
        return "no space left on the device"
    if e.errno == errno.EDQUOT:
        return "disk quota exceeded"
    return e.strerror or type(e).__name__


def tmp_name(path: Path, suffix: str = "") -> Path:
    """`<name>.tmp<pid><suffix>` beside `path`, the name cut short where the whole would pass the
    file system's 255 bytes (a long final name must not fail at its temporary, after the work)."""
    name, tail = path.name, f".tmp{os.getpid()}{suffix}"
    while len(os.fsencode(name + tail)) > 255 and len(name) > 1:
        name = name[:-1]
    return path.with_name(name + tail)


def _regular(path: Path) -> Path:
    """Where a write of `path` must land: a symlink's target (the link stays a link), never a
    device, pipe or socket (a rename over /dev/null would replace it for every process). A path the
    file system refuses to look at (a name over 255 bytes) is an OutputError too."""
    try:
        if path.is_symlink():
            path = Path(os.path.realpath(path))
        odd = path.exists() and not path.is_file() and not path.is_dir()
    except OSError as e:
        raise OutputError(f"cannot write {path}: {os_reason(e)}") from None
    if odd:
        raise OutputError(f"cannot write {path}: it is not a regular file (a device, pipe or socket); "
                          "give a file path")
    return path


def write_with(path: Path, write: Callable[[Path], None], *, sync: bool = True) -> None:
    """`write(tmp)` makes the file at a temporary name beside `path` (ending in the same suffix, for
    writers that choose the format by it), then the temporary replaces `path`: all or nothing. A
    failure (full disk, say, or any exception of `write`) removes the temporary and leaves any
    earlier `path` untouched; an OSError becomes an OutputError that names `path`. `sync=False`
    skips the fsync: for hints, not records."""
    path = _regular(Path(path))
    tmp = tmp_name(path, path.suffix)
    try:
        write(tmp)
        if sync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):  # the temporary may never have been created
            tmp.unlink()
        if isinstance(e, OSError):
            raise OutputError(f"cannot write {path}: {os_reason(e)}") from None
        raise


def publish(tmp: Path, path: Path) -> None:
    """A temporary that its writer built and synced over many calls (a shard) takes its final name."""
    try:
        os.replace(tmp, path)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {os_reason(e)}") from None


def move_aside(folder: Path, names: list[str], prefix: str) -> tuple[Path, list[str]]:
    """Rename those of `names` that exist in `folder` into a fresh folder/<prefix>-<UTC time>[-n]/;
    returns (that folder, the names moved). Nothing is deleted."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest, n = folder / f"{prefix}-{stamp}", 1
    while dest.exists():
        n += 1
        dest = folder / f"{prefix}-{stamp}-{n}"
    dest.mkdir()
    moved = [name for name in names if (folder / name).exists()]
    for name in moved:
        (folder / name).rename(dest / name)
    return dest, moved


def same_file(a: Path, b: Path) -> bool:
    """Whether `a` and `b` name one file: the same file on disk when both exist (symlinks, hard
    links, bind mounts), else the same resolved path (one of them is still to be written)."""
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
        return a.resolve() == b.resolve()
    except (OSError, RuntimeError):  # a symlink loop, an unreadable folder: not provably one file
        return False


def inside(path: Path, folder: Path) -> bool:
    """Whether `path`, its symlinks and `..` resolved, lies in `folder` (or is it)."""
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except (OSError, RuntimeError):
        return False


def refuse_output_over_inputs(flag: str, output: Path, *, files=(), folders=()) -> None:
    """Before any work: an output that is one of the input `files` (a checkpoint, an image), or lies
    in (or is) an input folder (a pack), would destroy what the command reads: a UserError naming
    both. `files` and `folders` are (what, path) pairs: ("the --ckpt", path)."""
    output = Path(output)
    for what, f in files:
        if same_file(output, Path(f)):
            raise OutputError(f"{flag} {shown(str(output))} is {what} {shown(str(f))}: writing it would destroy it "
                              "(choose another output path)")
    for what, d in folders:
        d = Path(d)
        if any(same_file(p, d) for p in (output, *output.parents)) or inside(output, d):
            raise OutputError(f"{flag} {shown(str(output))} lies inside {what} {shown(str(d))}: writing it would "
                              "change the data (choose a path outside it)")


def write_atomic(path: Path, data: bytes, *, sync: bool = True) -> None:
    """`data` at `path`, all or nothing (see `write_with`)."""
    write_with(path, lambda tmp: Path(tmp).write_bytes(data), sync=sync)


def _finite(obj):
    """`obj` with every nan or inf float as None: JSON has no such numbers, and a reader (jq,
    JavaScript, a strict parser) refuses the file Python would write for them."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json_atomic(path: Path, obj) -> None:
    write_atomic(path, (json.dumps(_finite(obj), indent=1, allow_nan=False) + "\n").encode())


def ensure_writable(path: Path, *, folder: bool = False) -> None:
    """Fail early, before any work, if `path` (a file, or a folder with folder=True) cannot be
    written: creates missing parent folders and probes with a temporary file it removes again,
    whatever happens."""
    path = Path(path) if folder else _regular(Path(path))
    where = path if folder else path.parent
    if not folder and path.is_dir():
        raise OutputError(f"cannot write {path}: it is a folder")
    if folder and path.exists() and not path.is_dir():
        raise OutputError(f"cannot write into {path}: it is a file, not a folder")
    existing = next(p for p in (where, *where.parents) if p.exists())
    if not existing.is_dir():
        raise OutputError(f"cannot write {path}: {existing} is a file, not a folder")
    # the probe is the temporary's own name where there is a file to come (its length is checked too)
    probe = tmp_name(where / ".fasttin-write-probe") if folder else tmp_name(path, path.suffix)
    try:
        where.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"\0")
    except OSError as e:
        raise OutputError(f"cannot write {path}: {os_reason(e)}") from None
    finally:  # a probe the disk filled up on is removed too
        with contextlib.suppress(OSError):
            probe.unlink()


def alive(pid: int) -> bool:
    """Whether process `pid` still runs (a leftover of a dead one may be removed)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_CLAIMS: dict[Path, int] = {}  # folder -> the open lock file this process holds it by


def claim(folder: Path, lock_name: str = ".lock") -> int | None:
    """Hold `folder` for this process: an exclusive lock on folder/lock_name, kept until
    `release_claims` or the process's end (a killed holder's lock goes with it: nothing stale to clean). Returns
    None, or the pid of the live process that holds it. A file system without locks holds nothing."""
    folder = Path(folder).resolve()
    if folder in _CLAIMS:
        return None
    try:
        fd = os.open(folder / lock_name, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise OutputError(f"cannot create {folder / lock_name}: {os_reason(e)}") from None
    try:  # a POSIX lock: the process's own, not inherited by its forked loader workers
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.read(fd, 32).decode(errors="replace").strip()
        os.close(fd)
        if e.errno not in (errno.EACCES, errno.EAGAIN):  # no locks here (some network file systems)
            return None
        return int(holder) if holder.isdigit() else -1
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _CLAIMS[folder] = fd
    return None


def release_claims() -> None:
    """Let go of every folder this process claimed (closing its descriptor drops the lock)."""
    while _CLAIMS:
        os.close(_CLAIMS.popitem()[1])


def clean_stale_tmp(folder: Path, ours: Callable[[str], object]) -> list[Path]:
    """Remove the temporaries `<final>.tmp<pid>[.ext]` in `folder` of the files whose final name
    `ours` accepts, whose process no longer runs: what a killed or failed save left behind. Only
    those: a user's own `notes.tmp123.txt` is never taken for one. Returns what it removed."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = _TMP.search(p.name)
        if (m and ours(p.name[:m.start()]) and p.is_file() and int(m.group(1)) != os.getpid()
                and not alive(int(m.group(1)))):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def digest(path: Path, algorithm: str = "sha256") -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


# ---- folders: built beside, then swapped in -------------------------------------------------------

def _building(out: Path) -> Path:
    return out.with_name(f"{out.name}.tmp{os.getpid()}")


def _replaced(out: Path) -> Path:
    return out.with_name(f"{out.name}.old.tmp{os.getpid()}")


def clean_stale_folders(out: Path, complete: Callable[[Path], bool],
                        ours: Callable[[Path], bool] = lambda p: True) -> list[Path]:
    """Remove what killed `replace_folder` calls for `out` left beside it: their build folders and
    the old folder they were replacing (put back first, or the finished new one, if they died
    between the two renames of the swap), where `ours` (the folder holds only what the builder
    writes) says so: a user's folder that merely looks like one is never touched. Returns what was
    removed."""
    out = Path(out)
    if not out.parent.is_dir():
        return []
    pattern = re.compile(re.escape(out.name) + r"(\.old)?\.tmp(\d+)")
    stale = [p for p in out.parent.iterdir()
             if (m := pattern.fullmatch(p.name)) and p.is_dir() and not p.is_symlink() and not alive(int(m.group(2)))
             and ours(p)]
    if not out.exists():  # died mid-swap: the finished new folder if there is one, else the old one
        for p in sorted(stale, key=lambda p: ".old." in p.name):
            if complete(p):
                os.rename(p, out)
                break
    removed = [p for p in stale if p.exists()]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


def replace_folder(out: Path, build: Callable[[Path], object]):
    """build(folder) fills a new folder beside `out`, which then replaces `out` (or becomes it):
    the old folder is renamed aside first and removed only once the new one is in place, with
    SIGINT/SIGTERM held back during the two renames. A failure or a kill leaves the old `out` as it
    was (a kill mid-swap is repaired by `clean_stale_folders`). Returns what build returned."""
    out = Path(out)
    work, old = _building(out), _replaced(out)
    try:
        work.mkdir()
    except OSError as e:
        raise OutputError(f"cannot create {work}: {os_reason(e)}") from None
    try:
        result = build(work)
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})  # no stop mid-swap
        try:
            if out.exists():
                os.rename(out, old)
            os.rename(work, out)
            fd = os.open(out.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            if old.exists() and not out.exists():
                os.rename(old, out)
            raise OutputError(f"cannot move the new {out.name} into {out}: {os_reason(e)}") from None
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return result
