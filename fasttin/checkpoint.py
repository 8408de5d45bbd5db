"""Checkpoints: written atomically, read with a clear error when they do not fit."""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch


class CheckpointError(Exception):
    pass


def save(path: Path, state: dict) -> None:
    """torch.save to a temporary name, fsync, rename: a crash never leaves half a checkpoint."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: Path) -> dict:
    if not Path(path).is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e})") from None


def check_fits(ckpt: dict, num_classes: int, stem: str | None = None, where: str = "checkpoint") -> None:
    """The checkpoint's architecture must be this run's: ResNet18, same class count (and stem)."""
    arch = ckpt.get("arch", {})
    if arch.get("name") != "resnet18":
        raise CheckpointError(f"{where} holds a {arch.get('name', 'unknown')} model, not a fasttin resnet18")
    if arch.get("num_classes") != num_classes:
        raise CheckpointError(f"{where} has {arch.get('num_classes')} classes; this data set has {num_classes}")
    if stem is not None and arch.get("stem") != stem:
        raise CheckpointError(f"{where} has the {arch.get('stem')} stem; this run asks for {stem}")


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def restore_model(ckpt: dict, device, channels_last: bool = True):
    """The checkpoint's model, in eval mode on `device`."""
    from fasttin.model import build_model
    arch = ckpt.get("arch", {})
    if arch.get("name") != "resnet18" or "model" not in ckpt:
        raise CheckpointError("not a fasttin checkpoint (no resnet18 'arch' and 'model' entries)")
    model = build_model(arch["num_classes"], arch["stem"])
    model.load_state_dict(ckpt["model"])
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return model.to(device, memory_format=fmt).eval()
