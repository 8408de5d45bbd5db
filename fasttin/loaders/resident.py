"""The resident backend: the whole split decoded once into device memory as uint8 [N, 64, 64, 3].

Per batch everything happens on the device, batch-wise (airbench style): take the epoch's
indices, cut/mirror/upscale (`augment.resize_batch`), normalise. The epoch's plan goes to the
device in one copy at the start of the epoch, so a batch costs no host work at all.
"""
from __future__ import annotations

import gc
import multiprocessing as mp
import os

import numpy as np
import torch

from fasttin.loaders.augment import resize_batch
from fasttin.loaders.base import Loader
from fasttin.loaders.sampler import PAD_LABEL
from fasttin.shards import IMAGE_SHAPE

IMAGE_BYTES = int(np.prod(IMAGE_SHAPE))


def free_memory(device: torch.device) -> int:
    """Bytes that can still be allocated on `device` (CUDA: free device memory; CPU: MemAvailable)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def needed_bytes(n: int, batch_size: int, res: int) -> int:
    """The split itself plus the per-batch working set (a few float copies of a batch at `res`)."""
    return n * IMAGE_BYTES + 6 * batch_size * 3 * res * res * 4


_DS = None


def _decode_chunk(idx):
    return _DS.images(idx)


def decode_all(ds, workers: int | None = None) -> np.ndarray:
    """Every sample of the split as uint8 [N, 64, 64, 3], decoded on the CPU by all cores."""
    workers = workers or os.cpu_count() or 1
    if ds.payload == "raw" or workers == 1 or len(ds) < 4096:
        return ds.images()
    global _DS
    _DS = ds
    gc.collect()  # nothing unreachable (a dropped DALI pipeline) may be finalised in a forked child
    with mp.get_context("fork").Pool(workers) as pool:
        return np.concatenate(pool.map(_decode_chunk, np.array_split(np.arange(len(ds)), len(ds) // 2048)))


class ResidentLoader(Loader):
    backend = "resident"

    def __init__(self, ds, sampler, **kw):
        super().__init__(ds, sampler, **kw)
        need, free = needed_bytes(len(ds), sampler.batch_size, self.res), free_memory(self.device)
        if need > free:
            raise MemoryError(
                f"resident backend needs {need / 2**30:.2f} GiB on {self.device} for {len(ds):,} images "
                f"of split {ds.split!r} at res {self.res}, but only {free / 2**30:.2f} GiB is free: "
                "use backend='dali' (streams from the shards) or backend='pil' (CPU workers)")
        self.images = torch.from_numpy(decode_all(ds)).to(self.device)
        self.labels = torch.from_numpy(ds.labels).to(self.device)

    def _epoch(self, epoch: int):
        plans = list(self.plans(epoch))
        if not plans:
            return
        cat = lambda name: torch.from_numpy(np.concatenate([getattr(p, name) for p in plans]))
        dev = self.device
        index, pad = cat("index").to(dev, non_blocking=True), cat("pad").to(dev, non_blocking=True)
        boxes, flips = cat("boxes").to(dev, non_blocking=True), cat("flips").to(dev, non_blocking=True)
        labels = torch.where(pad, PAD_LABEL, self.labels[index])
        shown = torch.where(pad, -1, index)
        start = 0
        for p in plans:
            s = slice(start, start + len(p.index))
            start = s.stop
            images = resize_batch(self.images[index[s]], boxes[s], flips[s], self.res, self.dtype, self.augment)
            yield self.output(images, labels[s], shown[s])
