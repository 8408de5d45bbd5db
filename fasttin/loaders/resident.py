"""The resident backend: the whole split decoded once into device memory as uint8.

Per batch everything happens on the device, batch-wise (airbench style): gather, upscale,
normalise. The epoch's plan goes to the device in one copy at the start of the epoch, so a batch
costs no host work at all.

The store is laid out so that the plan's cut and mirror cost nothing: with `flip` or `crop` it
holds every image twice, as is and mirrored (a flip is an index), and with `crop` every image is
black-padded by CROP_PAD, so a crop is an offset. A batch is then ONE row gather (`index_select`
over an overlapping view whose rows are every 64-pixel row of the store): crop, flip and the
sample gather together, memcpy-speed on the CPU, one kernel on CUDA. `rrc` keeps the plain store
and mirrors in its interpolation matrices.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from fasttin.forking import fork_pool
from fasttin.loaders.augment import CROP_PAD, SIZE, resize_boxes, upscale_normalize
from fasttin.loaders.base import Loader
from fasttin.loaders.errors import DoesNotFit
from fasttin.loaders.sampler import PAD_LABEL
from fasttin.machine import usable_cores
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


def store_layout(augment: str) -> tuple[int, int]:
    """(copies, side) of each image in the store: mirrored copies for flip/crop, padding for crop."""
    copies = 2 if augment in ("flip", "crop") else 1
    return copies, SIZE + 2 * CROP_PAD * (augment == "crop")


def needed_bytes(n: int, batch_size: int, res: int, augment: str = "none") -> int:
    """The store plus the per-batch working set (a few float copies of a batch at `res`)."""
    copies, side = store_layout(augment)
    return n * copies * side * side * 3 + 6 * batch_size * 3 * res * res * 4


_DS = None


def _decode_chunk(idx):
    return _DS.images(idx)


def decode_all(ds, workers: int | None = None) -> np.ndarray:
    """Every sample of the split as uint8 [N, 64, 64, 3], decoded on the CPU by all cores."""
    workers = workers or usable_cores()
    if ds.payload == "raw" or workers == 1 or len(ds) < 4096:
        return ds.images(np.arange(len(ds)))
    global _DS
    _DS = ds
    with fork_pool(workers) as pool:
        out = np.concatenate(pool.map(_decode_chunk, np.array_split(np.arange(len(ds)), len(ds) // 2048)))
        pool.close()  # the workers leave on their own; terminate() (the with's exit) then has nothing to stop
        pool.join()
    return out


class ResidentLoader(Loader):
    backend = "resident"

    def __init__(self, ds, sampler, **kw):
        super().__init__(ds, sampler, **kw)
        need = needed_bytes(len(ds), sampler.batch_size, self.res, self.augment)
        free = free_memory(self.device)
        if need > free:
            raise DoesNotFit(
                f"resident backend needs {need / 2**30:.2f} GiB on {self.device} for {len(ds):,} images "
                f"of split {ds.split!r} at res {self.res}, but only {free / 2**30:.2f} GiB is free: "
                "use backend='dali' (streams from the shards) or backend='pil' (CPU workers)")
        images = decode_all(ds)
        self.labels = torch.from_numpy(ds.labels).to(self.device)
        if self.augment == "rrc":
            self.images = torch.from_numpy(images).to(self.device)
        else:
            self.copies, self.side = store_layout(self.augment)
            self.rows = build_store(images, self.copies, self.side, self.device)
            self.row_steps = torch.arange(SIZE, device=self.device) * self.side

    def _epoch(self, epoch: int):
        plans = list(self.plans(epoch))
        if not plans:
            return
        cat = lambda name: self.to_device(np.concatenate([getattr(p, name) for p in plans]))  # pinned on CUDA
        index, pad, boxes, flips = cat("index"), cat("pad"), cat("boxes"), cat("flips")
        labels = torch.where(pad, PAD_LABEL, self.labels[index])
        shown = torch.where(pad, -1, index)
        first_row = None if self.augment == "rrc" else self.first_rows(index, boxes, flips)

        def batch(s: slice):
            if first_row is None:
                images = resize_boxes(self.images[index[s]], boxes[s], flips[s], self.pass_res, self.dtype)
            else:
                images = upscale_normalize(self.windows, first_row[s], self.pass_res, self.dtype)
            return self.output(images, labels[s], shown[s])
        ends = np.cumsum([len(p.index) for p in plans])
        yield from self.ahead(lambda s=slice(a, b): batch(s) for a, b in zip([0, *ends[:-1]], ends))

    def first_rows(self, index: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        """Row number in `self.rows` of each sample's first output row: its image (or the mirrored
        copy) and its window's top-left corner, the plan's crop offset taken in padded pixels."""
        pad = (self.side - SIZE) // 2
        x0, y0 = boxes[:, 0].long() + pad, boxes[:, 1].long() + pad
        if self.copies == 2:  # the mirrored copy's window of a flipped sample starts at side-64-x0
            x0 = torch.where(flips, self.side - SIZE - x0, x0)
            index = index * 2 + flips.long()
        return (index * self.side + y0) * self.side + x0

    def windows(self, first_row: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, 64, 64] channels_last: every sample's 64 rows in one gather."""
        rows = (first_row[:, None] + self.row_steps).view(-1)
        return self.rows.index_select(0, rows).view(-1, SIZE, SIZE, 3).permute(0, 3, 1, 2)


def build_store(images: np.ndarray, copies: int, side: int, device: torch.device,
                chunk: int = 8192) -> torch.Tensor:
    """The store on `device`, as a view of overlapping rows: row r is the 64-pixel row (192 bytes)
    that starts at pixel r of the [N * copies, side, side, 3] store (the images, each padded to
    `side`, then its mirror image when copies == 2). Filled a chunk at a time, so that building
    it needs little beyond the store itself."""
    n, pad = len(images), (side - SIZE) // 2
    store = torch.zeros((n, copies, side, side, 3), dtype=torch.uint8, device=device)
    for a in range(0, n, chunk):
        part = store[a:a + chunk]
        part[:, 0, pad:pad + SIZE, pad:pad + SIZE] = torch.from_numpy(images[a:a + chunk]).to(device)
        if copies == 2:
            part[:, 1] = part[:, 0].flip(2)
    flat = store.view(-1)
    return flat.as_strided((flat.numel() // 3 - SIZE + 1, SIZE * 3), (3, 1))
