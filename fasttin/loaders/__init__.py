"""make_loader: packed shards -> normalised channels_last batches on the device, by one of three
backends with the same surface (dali, resident, pil). Arguments are checked here, once, so that
a bad one fails at construction with a message that names it, never in a worker.
"""
from __future__ import annotations

import ctypes
import logging

import torch

from fasttin.loaders.base import Loader, check_res
from fasttin.loaders.errors import DataError, LoaderArgumentError
from fasttin.loaders.sampler import PAD_LABEL, EpochSampler
from fasttin.recipes import AUGMENTS, BACKENDS
from fasttin.shards import open_split

log = logging.getLogger("fasttin.loaders")
__all__ = ["make_loader", "choose_backend", "better_backend", "Loader", "BACKENDS", "AUGMENTS", "PAD_LABEL",
           "DataError", "LoaderArgumentError"]


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
    """(backend, why) for backend='auto': resident where the decoded split fits in the device's
    memory (on the CPU too: a batch is then a gather, where the pil workers decode every image
    again each epoch on the cores the step needs), else dali on a GPU, else pil."""
    from fasttin.loaders import dali, resident
    need, free = resident.needed_bytes(len(ds), batch_size, res, augment), resident.free_memory(device)
    if need <= free:
        return "resident", f"the split fits on {device} ({need / 2**30:.2f} GiB of {free / 2**30:.1f} GiB free)"
    why = dali.available() if device.type == "cuda" else "there is no GPU for DALI"
    if why is None:
        return "dali", f"the split does not fit on {device} ({need / 2**30:.2f} GiB needed): DALI streams it"
    return "pil", f"the split does not fit on {device} ({need / 2**30:.2f} GiB needed) and {why}"


def better_backend(loader: Loader, res: int) -> str | None:
    """A hint when `auto` would choose another backend than `loader`'s for batches of `res`
    (never pil: it is nobody's faster choice), e.g. "the split fits on cuda:0 ...: try --backend resident"."""
    auto, why = choose_backend(loader.ds, loader.device, loader.batch_size, res, loader.augment)
    return f"{why}: try --backend {auto}" if auto not in (loader.backend, "pil") else None


def check_arguments(*, backend, augment, res, batch_size, rank, world_size, dtype, workers) -> None:
    """LoaderArgumentError (one line, naming the argument) for anything make_loader cannot use."""
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise LoaderArgumentError(message)

    def whole(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    need(backend in BACKENDS, f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    need(augment in AUGMENTS, f"unknown augment {augment!r}: choose one of {', '.join(AUGMENTS)}")
    check_res(res)
    need(whole(batch_size) and batch_size >= 1, f"batch_size must be a positive integer, got {batch_size!r}")
    need(whole(world_size) and world_size >= 1, f"world_size must be a positive integer, got {world_size!r}")
    need(whole(rank) and 0 <= rank < world_size, f"rank {rank!r} is not in [0, world_size={world_size})")
    need(workers is None or (whole(workers) and workers >= 0),
         f"workers must be a non-negative integer or None, got {workers!r}")
    need(dtype in (torch.bfloat16, torch.float16, torch.float32),
         f"dtype must be torch.bfloat16, torch.float16 or torch.float32, got {dtype!r}")


def parse_device(device) -> torch.device:
    """'cpu', 'cuda' or 'cuda:N' (a torch.device too) that exists here, else LoaderArgumentError."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):  # torch's words for an unparsable device string
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise LoaderArgumentError(f"unknown device {device!r}: use 'cpu', 'cuda' or 'cuda:N'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LoaderArgumentError(f"device={device!r} but no CUDA device is available: pass device='cpu'")
        if (dev.index or 0) >= torch.cuda.device_count():
            raise LoaderArgumentError(f"device={device!r} but only {torch.cuda.device_count()} CUDA device(s) exist")
    return dev


def make_loader(data_dir, split, *, backend="auto", res=224, batch_size=256, device="cuda", augment="none",
                shuffle=True, drop_last=True, seed=0, rank=0, world_size=1, dtype=torch.bfloat16,
                return_index=False, verify=False, workers=None) -> Loader:
    """Batches of split `split` of the packed data set in `data_dir`; see Loader for what they hold.

    backend: auto | dali | resident | pil; augment: none | flip | crop | rrc (at 64x64, before the
    bicubic upscale to `res`). `workers` sets DALI threads or DataLoader processes (default: all cores).
    """
    check_arguments(backend=backend, augment=augment, res=res, batch_size=batch_size, rank=rank,
                    world_size=world_size, dtype=dtype, workers=workers)
    device = parse_device(device)
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
