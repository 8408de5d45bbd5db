"""Which samples go in which batch: the epoch permutation, the rank split, padding, and the
augmentation plan of each batch. Host-side, vectorised, shared by every backend, so that the same
(seed, epoch) gives the same batches whatever the backend.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fasttin.loaders.augment import plan
from fasttin.loaders.errors import LoaderArgumentError

PAD_LABEL = -100  # the label of a padding sample: CrossEntropyLoss ignores it, metrics skip it


@dataclass
class BatchPlan:
    index: np.ndarray  # int64 [n] positions in the split; padding repeats real samples
    pad: np.ndarray  # bool [n] True where the sample only pads the rank to stay in step
    boxes: np.ndarray  # float32 [n, 4] (x0, y0, w, h) of the 64x64 source to upscale
    flips: np.ndarray  # bool [n]
    res: int = 0  # the side to upscale to (the loader stamps its pass's resolution)


class EpochSampler:
    """Every sample exactly once per epoch over all ranks (or all but a dropped tail)."""

    def __init__(self, n: int, batch_size: int, *, shuffle: bool, drop_last: bool, seed: int,
                 rank: int, world_size: int, augment: str):
        if not 0 <= rank < world_size:
            raise LoaderArgumentError(f"rank {rank} is not in [0, world_size={world_size})")
        self.n, self.batch_size, self.shuffle, self.drop_last = n, batch_size, shuffle, drop_last
        self.seed, self.rank, self.world_size, self.augment = seed, rank, world_size, augment
        if drop_last:
            self.per_rank = n // (world_size * batch_size) * batch_size
        else:
            self.per_rank = -(-n // world_size)  # ceil: the short ranks are padded
        if n == 0:  # whatever drop_last says: there is nothing to batch
            raise LoaderArgumentError("the split is empty (0 samples): there is nothing to load from it")
        if self.per_rank == 0:
            raise LoaderArgumentError(f"{n} samples make no batch of {batch_size} over {world_size} rank(s) "
                                      "with drop_last=True: lower batch_size or set drop_last=False")

    def __len__(self) -> int:
        return -(-self.per_rank // self.batch_size)

    def rank_indices(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(indices, pad mask) of this rank for `epoch`."""
        order = (np.random.default_rng([self.seed, epoch]).permutation(self.n) if self.shuffle
                 else np.arange(self.n))
        total = self.per_rank * self.world_size
        pad = np.arange(total) >= self.n
        order = np.resize(order, total)  # wraps around: padding repeats the first samples
        return order[self.rank::self.world_size], pad[self.rank::self.world_size]

    def batches(self, epoch: int, first: int = 0):
        """The plans of `epoch` from batch `first` on (the earlier ones are drawn and dropped, so a
        resumed epoch sees exactly the batches it would have seen)."""
        index, pad = self.rank_indices(epoch)
        rng = np.random.default_rng([self.seed, epoch, self.rank, 1])
        for k, start in enumerate(range(0, len(index), self.batch_size)):
            idx = index[start:start + self.batch_size]
            boxes, flips = plan(rng, len(idx), self.augment)
            if k >= first:
                yield BatchPlan(idx, pad[start:start + self.batch_size], boxes, flips)
