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

import errno
import io
import pickle
import random
import re
import struct
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from fasttin.errors import UserError

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct
from fasttin.fileio import why, write_atomic

# exact types: an np.float64 is a float, but a restricted load cannot read it back
# Checkpoints of earlier fasttin versions hold numpy's RNG state as an ndarray. Rebuilding a plain
# array calls no code of the file's choosing (object arrays hold items the restricted unpickler
# already vetted), so these three are allowed too: torch documents them for exactly this.
_NUMPY_ARRAYS = [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
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


def read(path: Path) -> object:
    """Whatever tensors and plain data `path` holds, read with the restricted unpickler.
    CheckpointError (one line) for a missing, damaged or hostile file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(_NUMPY_ARRAYS):
            warnings.simplefilter("ignore", UserWarning)  # "pickle protocol 4": irrelevant once refused
            return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM, errno.EIO, errno.ENOENT):
            raise CheckpointError(f"cannot read {path}: {why(e)}") from None
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


def check_fits(ckpt: dict, num_classes: int, stem: str | None = None, where: str = "checkpoint") -> None:
    """The checkpoint's architecture must be this run's: ResNet18, same class count (and stem)."""
    arch = ckpt.get("arch") if isinstance(ckpt.get("arch"), dict) else {}
    if arch.get("name") != "resnet18":
        raise CheckpointError(f"{where} holds a {arch.get('name', 'unknown')} model, not a fasttin resnet18")
    if arch.get("num_classes") != num_classes:
        raise CheckpointError(f"{where} has {arch.get('num_classes')} classes; this data set has {num_classes}")
    if stem is not None and arch.get("stem") != stem:
        raise CheckpointError(f"{where} has the {arch.get('stem')} stem; this run asks for {stem}")


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


def restore_model(ckpt: dict, device, channels_last: bool = True, where: str = "checkpoint"):
    """The checkpoint's model, in eval mode on `device`; CheckpointError if it is not a fasttin
    ResNet18 checkpoint (a bare state dict, another model's weights, a damaged entry)."""
    from fasttin.model import STEMS, build_model
    arch = ckpt.get("arch") if isinstance(ckpt.get("arch"), dict) else {}
    if arch.get("name") != "resnet18" or not isinstance(ckpt.get("model"), dict):
        raise CheckpointError(f"{where} is not a fasttin checkpoint (no resnet18 'arch' and 'model' entries)")
    classes, stem = arch.get("num_classes"), arch.get("stem")
    if not isinstance(classes, int) or classes < 1 or stem not in STEMS:
        raise CheckpointError(f"{where}: bad architecture entry (num_classes {classes!r}, stem {stem!r})")
    model = build_model(classes, stem)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:  # missing/unexpected keys or shapes: another model's weights
        detail = [line.strip() for line in str(e).splitlines() if line.strip()][1:2] or [""]
        raise CheckpointError(f"{where}: its weights are not a resnet18 {stem} {classes}-class model's "
                              f"({detail[0][:120]})") from None
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return model.to(device, memory_format=fmt).eval()


def class_names(ckpt: dict, where: str = "checkpoint") -> tuple[list[str], list[str]]:
    """(wnids, words) of the checkpoint's classes, one per output; index names when it has none.
    The lists come from a file, so their shape is checked before anything indexes them."""
    n = ckpt["arch"]["num_classes"]
    wnids = ckpt.get("classes") or [str(i) for i in range(n)]
    words = ckpt.get("words") or [""] * n
    for name, values in (("classes", wnids), ("words", words)):
        if not isinstance(values, list) or len(values) != n or not all(isinstance(v, str) for v in values):
            raise CheckpointError(f"{where}: its '{name}' entry is not a list of {n} names")
    return wnids, words


def trained_res(ckpt: dict, where: str = "checkpoint") -> int:
    """The resolution the checkpoint was trained at (64 for checkpoints that do not say)."""
    res = ckpt["arch"].get("res", 64)
    if not isinstance(res, int) or res < 16:
        raise CheckpointError(f"{where}: bad 'res' entry {res!r} in its architecture")
    return res
