"""How big a slice `resident`'s CPU upscale + normalise should take (augment.SLICE_BYTES), and why.

  python tools/slice_sizes.py [IMAGES_PER_SLICE ...]    # default 25 7 5 4 3; res 224, batch 100, bf16

First the normalisation alone, one thread: into a reused buffer, then into a fresh one while the
two previous batches are still held (as a consumer holds them). Then upscale_normalize on the
machine's threads with each slice size, SLICE_BYTES set to that many images, alternated over 7
rounds, the consumer holding its last two batches; prints the median ms a batch. Every slice size
must give the same bits (checked).
"""
from __future__ import annotations

import statistics
import sys
import time

import torch

import fasttin.loaders.augment as aug
from benchmarks.runner import rotation
from fasttin.loaders import _keep_freed_memory_mapped

RES, BATCH, DTYPE = 224, 100, torch.bfloat16


def median_ms(fn, n: int = 30) -> float:
    fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def holding(make):
    """fn() that makes a batch and keeps the last two, as a consumer does."""
    held = []

    def fn():
        held.append(make())
        del held[:-2]
    return fn


def main(argv: list[str]) -> int:
    _keep_freed_memory_mapped()
    sizes = [int(a) for a in argv] or [25, 7, 5, 4, 3]
    store = torch.randint(0, 256, (10000, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    gather = lambda k: store[k].permute(0, 3, 1, 2)  # noqa: E731
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    up = aug.upscale(gather(torch.arange(BATCH)), RES)
    reused = torch.empty((BATCH, RES, RES, 3), dtype=DTYPE)
    print(f"normalise a batch of {BATCH} at {RES}, one thread: into a reused buffer "
          f"{median_ms(lambda: aug.normalize(up, DTYPE, reused)):.1f} ms, into a fresh one, two held "
          f"{median_ms(holding(lambda: aug.normalize(up, DTYPE))):.1f} ms")
    torch.set_num_threads(threads)
    per_image = RES * RES * 3 * (1 + torch.empty((), dtype=DTYPE).element_size())
    g = torch.Generator().manual_seed(1)

    def batch(size: int, keys: torch.Tensor) -> torch.Tensor:
        aug.SLICE_BYTES = size * per_image
        return aug.upscale_normalize(gather, keys, RES, DTYPE)
    reference = batch(sizes[0], torch.arange(BATCH))
    rounds = {s: [] for s in sizes}
    for r in range(7):
        for s in rotation(sizes, r):  # each size goes first in turn
            rounds[s].append(median_ms(holding(lambda s=s: batch(s, torch.randint(0, 10000, (BATCH,), generator=g))),
                                       20))
    for s in sizes:
        assert torch.equal(batch(s, torch.arange(BATCH)), reference), s
        print(f"{s:3d} images a slice: {statistics.median(rounds[s]):5.1f} ms a batch "
              f"(rounds: {', '.join(f'{x:.1f}' for x in rounds[s])})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
