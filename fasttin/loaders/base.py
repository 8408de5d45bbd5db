"""What every loader backend shares: the epoch counter, batch count, and how a batch is handed out."""
from __future__ import annotations

import numpy as np
import torch

from fasttin.loaders.errors import LoaderArgumentError
from fasttin.loaders.sampler import PAD_LABEL, BatchPlan, EpochSampler
from fasttin.recipes import res_problem
from fasttin.shards import SplitDataset


def check_res(res) -> None:
    """The one check of a resolution a loader hands out (make_loader's and set_res's)."""
    why = res_problem(res)
    if why:
        raise LoaderArgumentError(f"res: {why}")


class Loader:
    """Iterating yields (images, labels[, indices]) for one epoch, then moves to the next epoch.

    images: [B, 3, res, res] `dtype` channels_last on `device`, ImageNet-normalised; labels: int64
    (PAD_LABEL where a sample only pads this rank); indices: int64 positions in the split, -1 for
    padding. `set_epoch(e)` picks the permutation explicitly (DistributedSampler style), and
    `set_res(r)` the resolution of the next passes (progressive resizing: the store stays 64x64).

    Every batch is a tensor of its own (no output buffer is reused), so a consumer may keep a
    batch as long as it likes. A pass may be left at any point; the next one starts clean.
    """

    backend = "?"

    def __init__(self, ds: SplitDataset, sampler: EpochSampler, *, res: int, device: torch.device,
                 dtype: torch.dtype, augment: str, return_index: bool):
        self.ds, self.sampler, self.res, self.device = ds, sampler, res, device
        self.dtype, self.augment, self.return_index = dtype, augment, return_index
        self.epoch, self.first_batch, self.pass_first, self.pass_res = 0, 0, 0, res
        self.batch_size = sampler.batch_size

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int, first_batch: int = 0) -> None:
        """The next pass is `epoch`, starting at batch `first_batch` (a mid-epoch resume)."""
        self.epoch, self.first_batch = epoch, first_batch

    def set_res(self, res: int) -> None:
        """The passes from the next one on hand out [B, 3, res, res] batches."""
        check_res(res)
        self.res = res

    def __iter__(self):
        """One pass. Handing out the epoch's last batch completes it (the next pass is the next
        epoch), whether or not the consumer then exhausts the iterator."""
        epoch, self.pass_first, self.first_batch, self.pass_res = self.epoch, self.first_batch, 0, self.res
        last = len(self) - self.pass_first
        for k, batch in enumerate(self._epoch(epoch), 1):
            if k == last and self.epoch == epoch:  # not moved by set_epoch meanwhile
                self.epoch = epoch + 1
            yield batch
        if last <= 0 and self.epoch == epoch:  # an empty pass: a resume at the epoch's very end
            self.epoch = epoch + 1

    def plans(self, epoch: int):
        """The pass's batch plans, each stamped with the pass's resolution."""
        for p in self.sampler.batches(epoch, self.pass_first):
            p.res = self.pass_res
            yield p

    def _epoch(self, epoch: int):
        raise NotImplementedError

    def host_targets(self, p: BatchPlan) -> tuple[np.ndarray, np.ndarray]:
        """(labels, indices) of a planned batch, padding marked."""
        labels = np.where(p.pad, PAD_LABEL, self.ds.labels[p.index])
        return labels, np.where(p.pad, -1, p.index)

    def to_device(self, a: np.ndarray) -> torch.Tensor:
        """A host array on the device without stalling it (pinned, non-blocking on CUDA)."""
        t = torch.from_numpy(np.ascontiguousarray(a))
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    def output(self, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor):
        return (images, labels, index) if self.return_index else (images, labels)

    def streams(self) -> SideStream | None:
        """Where batches are made one ahead: the loader's own CUDA stream, none elsewhere."""
        if self.device.type != "cuda":
            return None
        if getattr(self, "_side", None) is None:
            self._side = SideStream(self.device)
        return self._side

    def ahead(self, makers):
        """The batches that `makers` (an iterable of calls, each making one batch) make, handed out
        in order. With a side stream, batch k+1 is queued on it before batch k is handed out, so it
        is made while the consumer's step k runs; each handed batch is waited for on the consumer's
        stream (an event, no host wait). Without one, each batch is made when it is asked for."""
        side = self.streams()
        if side is None:
            yield from (make() for make in makers)
            return
        pending = None
        side.start()
        for make in makers:
            with side:
                batch, done = make(), side.record()
            if pending is not None:
                yield side.hand(*pending)
            pending = (batch, done)
        if pending is not None:
            yield side.hand(*pending)


class SideStream:
    """A loader's CUDA stream: batches are made on it and handed to the consumer's stream through
    an event per batch, and `record_stream` keeps the allocator from reusing a handed batch's
    memory before the consumer's work on it is done."""

    def __init__(self, device: torch.device):
        self.device, self.stream = device, torch.cuda.Stream(device)

    def start(self) -> None:
        """A pass's first batch waits for what the consumer queued before it (the plan's copy)."""
        self.stream.wait_stream(torch.cuda.current_stream(self.device))

    def __enter__(self):
        self._ctx = torch.cuda.stream(self.stream)
        self._ctx.__enter__()

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)

    def record(self):
        event = torch.cuda.Event()
        event.record(self.stream)
        return event

    def hand(self, batch: tuple, event):
        consumer = torch.cuda.current_stream(self.device)
        consumer.wait_event(event)
        for t in batch:
            t.record_stream(consumer)
        return batch
