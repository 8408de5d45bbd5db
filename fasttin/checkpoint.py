"""Checkpoints are data, never code: written atomically, read with `weights_only=True`.

A `.pt` file is a pickle, and an unrestricted unpickle runs whatever the file says, so a crafted
checkpoint given to `predict`, `eval` or `--resume` could run a command. Every load here uses
torch's restricted unpickler (tensors, dicts, lists, tuples, str, int, float, bool, None), and
`save` refuses to write anything else, so what we write is always what we can read back: the RNG
states of numpy and Python are converted to tensors and lists (`rng_state`) and back exactly
(`set_rng_state`). A file that asks for anything more is refused with one line, before any of its
objects is built.
"""
from __future__ import annotations

import contextlib
import errno
import io
import pickle
import random
import re
import struct
import threading
import time
import warnings
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fasttin.errors import UserError, shown

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct
from fasttin.fileio import os_reason, write_atomic

# Checkpoints of earlier fasttin versions hold numpy's RNG state as an ndarray. Rebuilding a plain
# array calls no code of the file's choosing (object arrays hold items the restricted unpickler
# already vetted), so the four names it takes are allowed too: torch documents them for exactly this.
_NUMPY_ARRAYS = [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
# exact types only: an np.float64 is a float, but a restricted load cannot read it back
_PLAIN = {str, int, float, bool, type(None), torch.Size, torch.dtype, torch.device}


class CheckpointError(UserError):
    """A checkpoint that is missing, damaged, hostile, or of another model or data set."""


def _check_data(obj, where: str = "state") -> None:
    """Everything `weights_only=True` can read back; anything else is a bug in the caller."""
    if type(obj) in _PLAIN or isinstance(obj, torch.Tensor):
        return
    if isinstance(obj, (dict, OrderedDict)):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"checkpoint {where}: key {k!r} is a {type(k).__name__}")
            _check_data(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_data(v, f"{where}[{i}]")
    else:
        raise TypeError(f"checkpoint {where} is a {type(obj).__module__}.{type(obj).__name__}, which "
                        "torch.load(weights_only=True) cannot read back: store tensors and plain data")


def save(path: Path, state: dict) -> None:
    """The state through fileio.write_atomic (temporary name, fsync, rename): a crash or a full disk
    never leaves half a checkpoint and never touches the previous one; a failure removes the
    temporary file and raises fileio.OutputError naming `path`. Serialised in memory first (a
    ResNet18 with its optimiser is about 90 MB), so the file write is one all-or-nothing step."""
    _check_data(state)
    buf = io.BytesIO()
    torch.save(state, buf)
    write_atomic(Path(path), buf.getbuffer())


def snapshot(obj):
    """`obj` with every tensor copied to the host, so that training may go on changing the originals:
    a CUDA tensor into pinned memory with a non-blocking copy on the current stream (ordered before
    any later in-place update there, and no wait for the device), a CPU tensor cloned."""
    if isinstance(obj, torch.Tensor):
        if obj.device.type == "cpu":
            return obj.detach().clone()
        host = torch.empty(obj.shape, dtype=obj.dtype, pin_memory=True)
        return host.copy_(obj.detach(), non_blocking=True)
    if isinstance(obj, (dict, OrderedDict)):
        return type(obj)((k, snapshot(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(v) for v in obj)
    return obj


class Saver:
    """Checkpoints off the training clock: `submit` snapshots the states (`snapshot`) and returns;
    a background thread waits for the copies, then serialises, writes and fsyncs each file in turn
    through `save` (all or nothing, so a kill -9 mid-write keeps the previous file). One write is
    in flight at a time: `submit` and `wait` join it first and re-raise its error (a full disk is
    then the run's OutputError, one save late). The `with` block's exit waits too: at the end of a
    run, on a signal's stop and on an error. `background=False` writes within `submit`."""

    def __init__(self, background: bool = True):
        self.background = background
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.longest_s = 0.0  # the longest whole save so far (snapshot to fsync): what a budget keeps room for

    def submit(self, writes: list[tuple[Path, dict]]) -> None:
        """Write each (path, state) in order, after the previous submission's."""
        self.wait()
        for _, state in writes:
            _check_data(state)  # here, in the caller: a bug is its traceback, not the thread's
        start = time.perf_counter()
        copies = [(Path(path), snapshot(state)) for path, state in writes]
        done = None
        if torch.cuda.is_available() and torch.cuda.is_initialized():  # the copies of CUDA tensors, queued
            done = torch.cuda.Event()
            done.record()
        if not self.background:
            self._write(copies, done, start)
            return
        self.thread = threading.Thread(target=self._write, args=(copies, done, start), name="fasttin-checkpoint",
                                       daemon=True)
        self.thread.start()

    def _write(self, copies: list, done, start: float) -> None:
        try:
            if done is not None:
                done.synchronize()
            for path, state in copies:
                save(path, state)
        except BaseException as e:
            if not self.background:
                raise
            self.error = e  # handed to the caller by wait()
        finally:
            self.longest_s = max(self.longest_s, time.perf_counter() - start)

    def wait(self) -> None:
        """The write in flight finished; its error, if any, raised here."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def __enter__(self) -> Saver:
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is None:
            self.wait()
            return
        with contextlib.suppress(BaseException):  # the run's own error is the one to report
            self.wait()


def _refusal(path, e: Exception) -> str:
    """One line for a load that failed: a forbidden object (code) or a damaged file."""
    text = str(e)
    forbidden = re.search(r"GLOBAL ([\w.]+)", text)
    if forbidden:
        return (f"{path}: refused: it asks to import {forbidden.group(1)}; a checkpoint must hold only "
                "tensors and plain data (it was not loaded, nothing in it ran)")
    first = next((line.strip() for line in text.splitlines() if line.strip()), "").split(". ")[0]
    if first.startswith("Weights only load failed"):
        first = "unreadable as tensors and plain data"
    elif isinstance(e, EOFError):
        first = "the file is empty or cut short"
    return f"{path} is not a torch checkpoint, or a damaged one ({first[:160]})"


def _check_crcs(path: Path) -> None:
    """A zip-format checkpoint (every torch.save since 1.6) must pass its members' CRC checks:
    torch.load does not verify them, so a flipped byte in a tensor's data would load as a wrong
    (or NaN) weight. About 30 ms for a 45 MB best.pt. An earlier, non-zip format has no CRCs."""
    try:
        if not zipfile.is_zipfile(path):
            return  # the legacy pickle format, or not a checkpoint at all: torch.load says which
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM, errno.EIO, errno.ENOENT):
            raise CheckpointError(f"cannot read {path}: {os_reason(e)}") from None
        raise CheckpointError(_refusal(path, e)) from None
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, ValueError, RuntimeError) as e:
        raise CheckpointError(_refusal(path, e)) from None
    if bad is not None:
        raise CheckpointError(f"{path} is not a torch checkpoint, or a damaged one (its member {shown(bad)} fails "
                              "its CRC check: the file changed after it was written)")


def read(path: Path) -> object:
    """Whatever tensors and plain data `path` holds, read with the restricted unpickler, after the
    zip's CRC checks. CheckpointError (one line) for a missing, damaged or hostile file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}" + (" (it is a folder)" if path.is_dir() else ""))
    _check_crcs(path)
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(_NUMPY_ARRAYS):
            warnings.simplefilter("ignore", UserWarning)  # "pickle protocol 4": irrelevant once refused
            return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM, errno.EIO, errno.ENOENT):
            raise CheckpointError(f"cannot read {path}: {os_reason(e)}") from None
        raise CheckpointError(_refusal(path, e)) from None  # EINVAL: a zip cut short
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, UnicodeDecodeError, struct.error,
            IndexError, KeyError, TypeError, AttributeError) as e:
        # what the restricted unpickler and the zip reader raise on hostile, cut or arbitrary bytes
        raise CheckpointError(_refusal(path, e)) from None


def load(path: Path) -> dict:
    """A fasttin checkpoint (a dict) from `path`; never runs code from the file."""
    obj = read(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a fasttin checkpoint")
    return obj


def rng_state() -> dict:
    """Every random stream a run draws from, as tensors, lists and numbers (weights_only-safe)."""
    name, key, pos, has_gauss, cached = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": {"name": name, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    """Undo `rng_state`: the draws after this equal the draws after the state was taken."""
    try:
        n, p = state["numpy"], state["python"]
        torch.set_rng_state(state["torch"])
        if isinstance(n, tuple):  # an earlier fasttin's checkpoint: numpy's and Python's own tuples
            np.random.set_state(n)
            random.setstate(p)
        else:
            np.random.set_state((n["name"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                                 n["cached_gaussian"]))
            random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise CheckpointError(f"the checkpoint's random-number states are damaged or from an older "
                              f"fasttin ({type(e).__name__}: {e})") from None
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Position:
    """Where a run stands, as its last.pt records it: what a resumed run continues from."""
    epoch: int = 0  # epochs done
    batch: int = 0  # batches done into the next epoch
    best: float = 0.0
    best_weights: str = "raw"  # which weights best.pt holds
    rows: list = field(default_factory=list)  # metrics.jsonl's rows up to this point
    rows_seen: int | None = None  # how many rows the checkpoint had seen (None: an earlier fasttin's)
    epoch_res: int | None = None  # the resolution of an epoch stopped midway
    partial: dict | None = None  # that epoch's metric sums, data wait, compute and wall seconds so far
    budget_spent_s: float = 0.0
    budget_reserve_s: float = 0.0

    def record(self, row: dict, val: dict) -> str | None:
        """Add an epoch's row; returns which weights ("raw" or "ema") best.pt must now hold, if any:
        the better of the two when it is at least as good as the best so far."""
        self.rows.append(row)
        self.batch, self.partial = 0, None
        which = "ema" if val.get("ema_acc1", -1.0) > val["acc1"] else "raw"
        top = val["ema_acc1"] if which == "ema" else val["acc1"]
        if top < self.best:
            return None
        self.best, self.best_weights = top, which
        return which

    def describe(self, budget_min: float) -> str:
        """Where a resumed run stands, for its log: epochs done, batches into the next, budget spent."""
        into = f", {self.batch} batch(es) into epoch {self.epoch + 1}" if self.batch else ""
        spent = f", {self.budget_spent_s:.1f} s of the {budget_min:g}-minute budget spent" if budget_min else ""
        return f"{self.epoch} epoch(s) done{into}{spent}"

    @classmethod
    def of(cls, ckpt: dict) -> Position:
        return cls(ckpt["epoch"], ckpt.get("step", 0), ckpt.get("best_acc1", 0.0), ckpt.get("best_weights", "raw"),
                   rows_seen=ckpt.get("rows") if isinstance(ckpt.get("rows"), int) else None,
                   epoch_res=ckpt.get("epoch_res"), partial=ckpt.get("partial"),
                   budget_spent_s=ckpt.get("budget_spent_s", 0.0),
                   budget_reserve_s=ckpt.get("budget_reserve_s", 0.0))


def run_state(step_state: dict, *, epoch: int, batch: int, **run) -> dict:
    """What last.pt holds: the step's state (model, optimizer, scaler, steps, EMA), the position
    (`epoch` epochs done, `batch` batches into the next), every random stream, and the run's
    own entries (config, best_acc1, classes, words, arch, budget_spent_s, epoch_res...)."""
    return {**step_state, "epoch": epoch, "step": batch, "rng": rng_state(), **run}


def best_state(weights: dict, which: str, **run) -> dict:
    """What best.pt holds: the weights that validated best (`which`: "raw" or "ema") as its "model",
    so that eval, predict and --pretrained read the best weights whichever they are."""
    return {"model": weights, "weights": which, **run}


def kept(out: Path) -> str:
    """What a run that failed still holds, for its error line: the last good checkpoint, or none."""
    last = Path(out) / "last.pt"
    return f"the last good checkpoint {last} is intact" if last.is_file() else "no checkpoint was saved"


def save_run(out: Path, step, pos: Position, cfg: dict, classes: list, words: list, *, epoch: int, batch: int,
             res: int, budget: dict | None = None, best: str | None = None, partial: dict | None = None,
             saver: Saver | None = None) -> None:
    """best.pt with the `best` weights ("raw" or "ema") when they validated best, then last.pt in `out`
    with the position (`epoch` done, `batch` into the next, and within an epoch its `partial` sums
    and times, so the resumed epoch's row counts all of it) and the `budget` figures: last.pt never
    records a best that best.pt does not hold, whatever the moment of a crash. Both name the
    classes and the architecture at the resolution they validate at, for eval and predict. The
    caller has checked the weights finite. `saver` writes them (default: now, in this thread)."""
    arch = {"name": "resnet18", "stem": cfg["stem"], "num_classes": len(classes), "res": cfg["eval_res"] or res}
    common = dict(config=cfg, best_acc1=pos.best, classes=classes, words=words, arch=arch)
    extra = {"rows": len(pos.rows), "best_weights": pos.best_weights,
             **({"epoch_res": res, "partial": partial} if batch else {})}
    extra.update(budget or {})
    writes = []
    if best is not None:  # first: last.pt commits the epoch, so a crash between the two repeats it
        weights = step.ema.model.state_dict() if best == "ema" else step.model.state_dict()
        writes.append((Path(out) / "best.pt", best_state(weights, best, epoch=epoch + (batch > 0), **common)))
    writes.append((Path(out) / "last.pt", run_state(step.state_dict(), epoch=epoch, batch=batch, **common, **extra)))
    (saver or Saver(background=False)).submit(writes)
