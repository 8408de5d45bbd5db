"""The dali backend: shards -> nvJPEG decode -> augmentation -> bicubic upscale -> normalise, all in
one NVIDIA DALI pipeline (the same graph on DALI's CPU operators when there is no GPU).

Payloads are zero-copy slices of the memory-mapped shards, fed a batch at a time through
`external_source`; DALI prefetches, so decoding batch k+1 overlaps the training step on batch k.
The output reaches torch through DLPack without a copy (DALI's default executor keeps each
output alive for as long as torch holds it, and makes torch's stream wait for it).
"""
from __future__ import annotations

from collections import deque

import numpy as np
import torch

from fasttin.loaders.augment import IMAGENET_MEAN, IMAGENET_STD, SIZE
from fasttin.loaders.base import Loader
from fasttin.loaders.errors import DataError, Unavailable
from fasttin.machine import usable_cores


def available() -> str | None:
    """None if DALI imports, else why not (for `auto`, skipped benchmark records, errors)."""
    try:
        import nvidia.dali  # noqa: F401
        return None
    except Exception as e:
        return f"NVIDIA DALI is not importable ({type(e).__name__}: {e})"


class _Feed:
    """external_source's iterable (cycle="raise"): DALI calls iter() again as soon as an epoch
    ends, before the trainer has said which epoch comes next, so the batches are drawn lazily
    at the first next() of an epoch."""

    def __init__(self, loader: DaliLoader):
        self.loader, self.batches = loader, None

    def __iter__(self):
        self.batches = None
        return self

    def __next__(self):
        if self.batches is None:
            self.batches = self.loader.plans(self.loader.feeding_epoch)
        p = next(self.batches)
        self.loader.in_flight.append(p)
        ds, augment = self.loader.ds, self.loader.augment
        out = [ds.encoded_batch(p.index)]
        if augment == "crop":
            out.append(p.boxes[:, :2].astype(np.int32))  # slice anchor (x, y), whole pixels
        if augment == "rrc":
            start = np.ascontiguousarray(p.boxes[:, [1, 0]])  # resize ROI in (y, x) order
            out += [start, start + p.boxes[:, [3, 2]]]
        if augment != "none":
            out.append(p.flips.astype(np.int32))
        return out


def build_pipeline(feed, *, payload: str, gpu: bool, res: int, augment: str, batch_size: int,
                   threads: int, device_id, seed: int):
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    n_inputs = 1 + (augment == "crop") + 2 * (augment == "rrc") + (augment != "none")

    @pipeline_def(batch_size=batch_size, num_threads=threads, device_id=device_id, seed=seed,
                  prefetch_queue_depth=2)
    def tin_pipeline():
        inputs = list(fn.external_source(source=feed, num_outputs=n_inputs, batch=True, cycle="raise"))
        data = inputs.pop(0)
        if payload == "jpeg":
            images = fn.decoders.image(data, device="mixed" if gpu else "cpu", output_type=types.RGB)
        else:
            images = fn.reshape(data.gpu() if gpu else data, shape=[SIZE, SIZE, 3], layout="HWC")
        if augment == "crop":
            images = fn.slice(images, start=inputs.pop(0), shape=[SIZE, SIZE], axis_names="WH",
                              out_of_bounds_policy="pad", fill_values=0)
        if augment == "rrc":
            images = fn.resize(images, size=[res, res], roi_start=inputs.pop(0), roi_end=inputs.pop(0),
                               roi_relative=False, interp_type=types.INTERP_CUBIC, antialias=True)
        elif res != SIZE:
            images = fn.resize(images, size=[res, res], interp_type=types.INTERP_CUBIC, antialias=True)
        mirror = inputs.pop(0) if augment != "none" else 0
        return fn.crop_mirror_normalize(images, dtype=types.FLOAT16, output_layout="HWC", mirror=mirror,
                                        mean=[m * 255 for m in IMAGENET_MEAN], std=[s * 255 for s in IMAGENET_STD])

    return tin_pipeline()


class DaliLoader(Loader):
    backend = "dali"

    def __init__(self, ds, sampler, *, threads: int | None = None, **kw):
        super().__init__(ds, sampler, **kw)
        why = available()
        if why:
            raise Unavailable(f"backend='dali' cannot run here: {why}; use backend='resident' or 'pil'")
        self.threads = threads or usable_cores()
        self.in_flight: deque = deque()
        self.feeding_epoch = 0
        self.pass_count, self.open_pass = 0, None  # the pass DALI is still in, if any
        self.feed = _Feed(self)
        self.build(self.res)

    def build(self, res: int) -> None:
        """The graph for `res` (its resize size is part of the graph: a new resolution builds anew)."""
        self.pipe = None  # the old graph's device memory goes before the new graph's comes
        gpu = self.device.type == "cuda"
        self.pipe = build_pipeline(
            self.feed, payload=self.ds.payload, gpu=gpu, res=res, augment=self.augment,
            batch_size=self.sampler.batch_size, threads=self.threads,
            device_id=(self.device.index or 0) if gpu else None, seed=self.sampler.seed * 1000 + self.sampler.rank)
        self.pipe.build()
        self.pipe_res = res

    def _epoch(self, epoch: int):
        """One pass. A pass that the consumer leaves early (at any batch, the last one included,
        or by starting another pass while it is still open) is drained before the next one
        starts, and the feed is rewound explicitly: DALI's own iter() on the feed comes at times
        of its choosing (after the end of the data, not when a consumer leaves)."""
        if self.open_pass is not None:
            self.drain()
        if self.pass_res != self.pipe_res:
            self.build(self.pass_res)
        self.pass_count += 1
        this_pass = self.open_pass = self.pass_count
        self.feeding_epoch = epoch
        self.feed.batches = None
        self.pipe.reset()
        try:
            while True:
                try:
                    (out,) = self.pipe.run()
                except StopIteration:
                    self.open_pass = None
                    return
                except RuntimeError:  # DALI's decoder failed: name the sample if it is one of ours
                    self.open_pass = None  # no drain: running a failed pipeline again would mask this
                    culprit = self.bad_sample()
                    if culprit is None:
                        raise
                    raise DataError(culprit) from None
                p = self.in_flight.popleft()
                images = torch.from_dlpack(out.as_tensor())  # [B, res, res, 3] fp16, no copy
                if images.dtype != self.dtype:
                    images = images.to(self.dtype)
                labels, index = self.host_targets(p)
                yield self.output(images.permute(0, 3, 1, 2), self.to_device(labels), self.to_device(index))
        finally:
            if self.open_pass == this_pass:  # left early, and no newer pass has taken over
                self.drain()

    def bad_sample(self) -> str | None:
        """The message of the first sample in flight that does not decode on the CPU, if any (a
        sample at a time, only after a failure)."""
        for p in list(self.in_flight):
            for i in p.index.tolist():
                try:
                    self.ds.image(i)
                except DataError as e:
                    return str(e)
        return None

    def drain(self) -> None:
        """End the open pass: no more input, and what DALI prefetched for it is dropped."""
        self.feed.batches = iter(())
        try:
            while True:
                self.pipe.run()
        except StopIteration:
            pass
        self.in_flight.clear()
        self.open_pass = None
