"""The pil backend: DataLoader workers decode with pillow(-simd), cut, mirror and upscale bicubically
on the CPU into uint8 batches (pinned on CUDA); normalisation happens on the target device.

The portable path, and the one the classic ImageFolder pipeline is compared with.
"""
from __future__ import annotations

import atexit
import contextlib
import signal
import weakref

import numpy as np
import torch
from PIL import Image
from torch.utils.data._utils import signal_handling

from fasttin.forking import before_fork
from fasttin.loaders.augment import normalize
from fasttin.loaders.base import Loader
from fasttin.loaders.errors import DataError, WorkersStalled
from fasttin.loaders.sampler import BatchPlan
from fasttin.machine import usable_cores


class _Batches(torch.utils.data.Dataset):
    """Maps a BatchPlan to a uint8 NHWC batch; runs inside the DataLoader workers."""

    def __init__(self, ds, augment: str):
        self.ds, self.augment = ds, augment

    def __getitem__(self, p: BatchPlan):
        """(uint8 batch, plan, None), or (None, plan, message) for a sample that does not decode:
        the main process raises it, as one line (a worker's exception would arrive wrapped in
        its traceback)."""
        try:
            return torch.from_numpy(self.batch(p)), p, None
        except DataError as e:
            return None, p, str(e)

    def batch(self, p: BatchPlan) -> np.ndarray:
        res = p.res  # the pass's resolution, stamped on its plans: workers live across passes
        out = np.empty((len(p.index), res, res, 3), np.uint8)
        for j, (i, box, flip) in enumerate(zip(p.index.tolist(), p.boxes.tolist(), p.flips.tolist())):
            x0, y0, w, h = box
            if self.augment != "crop" and res == w == h and not flip:
                out[j] = self.ds.image(i)  # nothing to cut, mirror or resize
                continue
            im = Image.fromarray(self.ds.image(i))
            if self.augment == "crop":  # PIL pads a crop outside the image with black
                im, x0, y0 = im.crop((x0, y0, x0 + w, y0 + h)), 0, 0
            if res != w or res != h or x0 or y0:
                im = im.resize((res, res), Image.BICUBIC, box=(x0, y0, x0 + w, y0 + h))
            if flip:
                im = im.transpose(Image.FLIP_LEFT_RIGHT)
            out[j] = np.asarray(im)
        return out


def _identity(x):
    return x


def _ignore_stop_signals(worker_id: int) -> None:
    """SIGINT and SIGTERM sent to the whole process group (Ctrl-C, `timeout`, Slurm, a pod's stop)
    must not kill the workers mid-epoch: the main process decides when to stop (the trainer
    finishes its step and saves), then stops them itself (`PilLoader.close`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)  # blocked since the fork: see _forking


_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


@contextlib.contextmanager
def _forking():
    """Block SIGINT/SIGTERM in this thread while the workers are forked. A worker installs torch's
    own SIGTERM handler before `_ignore_stop_signals` runs, so a group signal landing in between
    killed it (seen on CI). Forked with the signals blocked, a worker has them pending until it
    ignores them; this process gets its own pending one as soon as the fork is done."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


_OPEN: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    """At exit, stop the workers of every loader still open: multiprocessing's own exit hook
    (registered earlier, so it runs later) would SIGTERM them, which they ignore, and then wait."""
    for loader in list(_OPEN):
        loader.close()


class _Plans:
    """The DataLoader's sampler: this epoch's batch plans, drawn in the main process. It holds its
    loader weakly: no reference cycle, so a dropped loader is closed at once, with its workers'
    queues still whole (left to the cycle collector, their feeder threads met closed pipes)."""

    def __init__(self, loader):
        self._loader, self.epoch = weakref.ref(loader), 0

    def __iter__(self):
        return self._loader().plans(self.epoch)

    def __len__(self):
        return len(self._loader())


# seconds without a batch from the workers before the loader gives up: a batch takes them well under
# a second (a few at most on a loaded machine); a worker that cannot pass one on (a full /dev/shm)
# prints its error and drops it, and the DataLoader would otherwise wait forever
WORKER_TIMEOUT_S = 300


class PilLoader(Loader):
    backend = "pil"

    def __init__(self, ds, sampler, *, workers: int | None = None, **kw):
        super().__init__(ds, sampler, **kw)
        workers = usable_cores() if workers is None else workers
        self._plans = _Plans(self)
        # Persistent workers: forked once, so a large parent (a trainer holding a DALI pipeline or
        # a resident split) does not pay copy-on-write faults again every epoch (measured: half the
        # throughput when forked per epoch inside the benchmark process).
        self._loader = torch.utils.data.DataLoader(
            _Batches(ds, self.augment), batch_size=None, sampler=self._plans, num_workers=workers,
            pin_memory=self.device.type == "cuda", prefetch_factor=4 if workers else None,
            collate_fn=_identity, persistent_workers=workers > 0, worker_init_fn=_ignore_stop_signals,
            multiprocessing_context="fork" if workers else None, timeout=WORKER_TIMEOUT_S if workers else 0)
        _OPEN.add(self)

    def close(self) -> None:
        """Stop the workers now. They ignore SIGTERM (see `_ignore_stop_signals`), and torch's own
        shutdown waits 5 s per idle persistent worker (it never sees the stop message while
        blocked in its 5 s poll), so they are killed first: `_kill_workers`."""
        _kill_workers(self._loader)

    def __del__(self):
        self.close()

    def _epoch(self, epoch: int):
        self._plans.epoch = epoch
        if self._loader.num_workers and _workers_iterator(self._loader) is None:
            before_fork()  # the workers are about to be forked
        with _forking():
            batches = iter(self._loader)  # forks the workers the first time (persistent after)
        def batch(images, p, failure):
            if failure is not None:
                raise DataError(failure)
            labels, index = self.host_targets(p)
            images = images.to(self.device, non_blocking=True)  # pinned by the DataLoader on CUDA
            return self.output(normalize(images.permute(0, 3, 1, 2), self.dtype), self.to_device(labels),
                               self.to_device(index))
        found = stall_checked(batches, self._loader.timeout, "the pil loader's")
        yield from self.ahead(lambda item=item: batch(*item) for item in found)


def stall_checked(batches, timeout: float, whose: str):
    """A DataLoader's batches, its timeout (a RuntimeError) reported as one line saying why."""
    while True:
        try:
            yield next(batches)
        except StopIteration:
            return
        except RuntimeError as e:
            if "timed out" not in str(e):
                raise
            raise WorkersStalled(f"{whose} workers handed out no batch for {timeout:g} s (a worker's "
                                 "error above says why; a full /dev/shm is the usual cause: in Docker, raise "
                                 "--shm-size; or --backend resident)") from None


# ---- torch's private DataLoader names: the only ones fasttin uses, all here ---------------------------
# torch has no public way to stop persistent workers without its 5 s wait per worker. These names
# are checked against the installed torch by tests/test_loaders.py (`torch_internals_missing`), so
# a torch upgrade that changes them fails the suite loudly instead of hanging or leaking workers.

def _workers_iterator(loader):
    """The persistent workers' iterator of a DataLoader (None before its first pass)."""
    return getattr(loader, "_iterator", None)


def _kill_workers(loader) -> None:
    """Kill a DataLoader's persistent workers, after torch stops watching their pids (a killed
    worker it still watched would raise SIGCHLD errors in this process), then let torch clean up."""
    it = _workers_iterator(loader)
    if it is None:
        return
    if getattr(it, "_worker_pids_set", False):
        signal_handling._remove_worker_pids(id(it))
        it._worker_pids_set = False
    for w in getattr(it, "_workers", []):
        if w.is_alive():
            w.kill()
    it._shutdown_workers()
    loader._iterator = None


def torch_internals_missing() -> list[str]:
    """The private torch names `_kill_workers` relies on that this torch lacks (none, or a bug)."""
    from torch.utils.data.dataloader import DataLoader, _MultiProcessingDataLoaderIter
    missing = [] if hasattr(signal_handling, "_remove_worker_pids") else ["signal_handling._remove_worker_pids"]
    missing += [f"_MultiProcessingDataLoaderIter.{n}" for n in ("_shutdown_workers",)
                if not hasattr(_MultiProcessingDataLoaderIter, n)]
    loader = DataLoader([0, 1], num_workers=1, persistent_workers=True, multiprocessing_context="fork")
    before_fork()
    it = iter(loader)
    try:
        missing += ["DataLoader._iterator" for _ in [0] if _workers_iterator(loader) is not it]
        missing += [f"_MultiProcessingDataLoaderIter.{n}" for n in ("_workers", "_worker_pids_set")
                    if not hasattr(it, n)]
    finally:
        _kill_workers(loader)
    return missing
