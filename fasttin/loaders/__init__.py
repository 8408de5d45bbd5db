"""make_loader: packed shards -> normalised channels_last batches on the device, by one of three
backends with the same surface (dali, resident, pil). Arguments are checked here, once, so that
a bad one fails at construction with a message that names it, never in a worker.
"""
from __future__ import annotations

import ctypes
import logging

import torch

from fasttin.loaders.augment import AUGMENTS
from fasttin.loaders.base import Loader
from fasttin.loaders.sampler import PAD_LABEL, EpochSampler
from fasttin.shards import open_split

BACKENDS = ("auto", "dali", "resident", "pil")
log = logging.getLogger("fasttin.loaders")
__all__ = ["make_loader", "Loader", "BACKENDS", "AUGMENTS", "PAD_LABEL"]


def _keep_freed_memory_mapped() -> None:
    """glibc unmaps large freed blocks, so every new CPU batch pays page faults again (measured:
    4x slower normalisation at res 224). Raising the mmap and trim thresholds keeps them reused."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 31)  # M_TRIM_THRESHOLD
    except OSError:
        pass  # not glibc: slower, still correct


def choose_backend(ds, device: torch.device, batch_size: int, res: int, augment: str = "none") -> tuple[str, str]:
    """(backend, why) for backend='auto'."""
    from fasttin.loaders import dali, resident
    if device.type != "cuda":
        return "pil", "no CUDA device: DataLoader workers on the CPU"
    need, free = resident.needed_bytes(len(ds), batch_size, res, augment), resident.free_memory(device)
    if need <= free:
        return "resident", f"the split fits on {device} ({need / 2**30:.2f} GiB of {free / 2**30:.1f} GiB free)"
    why = dali.available()
    if why is None:
        return "dali", f"the split does not fit on {device} ({need / 2**30:.2f} GiB needed): DALI streams it"
    return "pil", f"the split does not fit on {device} and {why}"


def make_loader(data_dir, split, *, backend="auto", res=224, batch_size=256, device="cuda", augment="none",
                shuffle=True, drop_last=True, seed=0, rank=0, world_size=1, dtype=torch.bfloat16,
                return_index=False, verify=False, workers=None) -> Loader:
    """Batches of split `split` of the packed data set in `data_dir`; see Loader for what they hold.

    backend: auto | dali | resident | pil; augment: none | flip | crop | rrc (at 64x64, before the
    bicubic upscale to `res`). `workers` sets DALI threads or DataLoader processes (default: all cores).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if augment not in AUGMENTS:
        raise ValueError(f"unknown augment {augment!r}: choose one of {', '.join(AUGMENTS)}")
    if not isinstance(res, int) or res < 16:
        raise ValueError(f"res must be an integer of at least 16, got {res!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"dtype must be bfloat16, float16 or float32, got {dtype}")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA device is available: pass device='cpu'")
    ds = open_split(data_dir, split, verify=verify)
    sampler = EpochSampler(len(ds), batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed, rank=rank,
                           world_size=world_size, augment=augment)
    if backend == "auto":
        backend, why = choose_backend(ds, device, batch_size, res, augment)
        log.info("make_loader: backend=%s (%s)", backend, why)
    if device.type == "cpu":
        _keep_freed_memory_mapped()
    kw = dict(res=res, device=device, dtype=dtype, augment=augment, return_index=return_index)
    if backend == "dali":
        from fasttin.loaders.dali import DaliLoader
        return DaliLoader(ds, sampler, threads=workers, **kw)
    if backend == "resident":
        from fasttin.loaders.resident import ResidentLoader
        return ResidentLoader(ds, sampler, **kw)
    from fasttin.loaders.pil import PilLoader
    return PilLoader(ds, sampler, workers=workers, **kw)
