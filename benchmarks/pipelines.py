"""The loaders the loader and train stages measure: fasttin's backends, and the classic pipeline
(torchvision ImageFolder over the split upscaled on disk with OpenCV, prepared once in --cache).

Loaders are built once per resolution (`Bench.shared`) and shared by the loader and train stages.
The classic cache writes one file per sample; every name taken from the data (class wnid, sample
key) must be a bare file name, so nothing is ever written outside the cache folder.
"""
from __future__ import annotations

import gc
import os
import time
from pathlib import Path

import torch

from benchmarks.runner import Bench, Skip
from fasttin.errors import UserError
from fasttin.fileio import OutputError, write_atomic
from fasttin.loaders import make_loader
from fasttin.loop import AMP_DTYPE


class UnsafeName(UserError):
    """A name read from the data that is not a bare file name: it would escape its folder."""


def bare_name(name: str, what: str) -> str:
    """`name` if it is a plain file name (no separator, not . or .., no control characters)."""
    bad = (not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name
           or any(ord(c) < 32 or ord(c) == 127 for c in name))
    if bad:
        raise UnsafeName(f"{what} {name!r} is not a bare file name; refusing to write it into the cache")
    return name


def backend_loader(b: Bench, backend: str, res: int):
    """fasttin's loader for `backend` at `res`, in the recipe's precision, as the trainer builds it."""
    def build():
        try:
            return make_loader(b.args.data, b.args.split, backend=backend, res=res, batch_size=b.args.batch_size,
                               device=b.device, augment=b.args.augment, dtype=AMP_DTYPE[b.args.amp], drop_last=True,
                               workers=b.args.workers)
        except (MemoryError, RuntimeError, UserError) as e:  # e.g. the split does not fit on the device
            raise Skip(f"backend {backend} cannot be built here: {e}") from None
    return b.shared(("loader", backend, res), build)


def classic_root(b: Bench, res: int) -> Path:
    """The split written as upscaled files once (OpenCV INTER_CUBIC), marked complete when done."""
    import cv2
    ds = b.ds
    tag = f"{Path(b.args.data).resolve().name}-{b.args.split}-{len(ds)}-{res}"
    root = Path(b.args.cache) / f"classic-{bare_name(tag, 'data set name')}"
    if (root / ".complete").exists():
        return root
    t = time.perf_counter()
    for i in range(len(ds)):
        label = ds.labels[i]
        d = root / (bare_name(ds.classes[label], "class name") if label >= 0 else "unlabeled")
        d.mkdir(parents=True, exist_ok=True)
        im = cv2.cvtColor(ds.image(i), cv2.COLOR_RGB2BGR)
        ok, png = cv2.imencode(Path(ds.keys[i]).suffix or ".png",
                               cv2.resize(im, (res, res), interpolation=cv2.INTER_CUBIC))
        if not ok:
            raise Skip(f"OpenCV cannot encode {ds.keys[i]!r} for the classic cache")
        _write(d / bare_name(ds.keys[i], "sample key"), png.tobytes())
    write_atomic(root / ".complete", f"{time.perf_counter() - t:.1f} s to prepare\n".encode())
    return root


def _write(path: Path, data: bytes) -> None:
    """One cache file; not atomic on its own (the folder counts only once `.complete` exists)."""
    try:
        path.write_bytes(data)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None


def classic_loader(b: Bench, res: int):
    """ImageFolder + RandomHorizontalFlip + ToTensor, DataLoader with all cores (the everyday baseline)."""
    def build():
        import torchvision.transforms as T
        from torchvision.datasets import ImageFolder
        folder = ImageFolder(str(classic_root(b, res)), T.Compose([T.RandomHorizontalFlip(), T.ToTensor()]))
        gc.collect()
        return torch.utils.data.DataLoader(folder, batch_size=b.args.classic_batch_size, shuffle=True,
                                           num_workers=b.args.workers or os.cpu_count(),
                                           pin_memory=b.device.type == "cuda", persistent_workers=True,
                                           drop_last=True)
    return b.shared(("loader", "classic", res), build)


class OnDevice:
    """A CPU loader's batches moved to the device in the trainer's layout (what fasttin's loaders
    hand out), so the classic pipeline can feed the same training step."""

    def __init__(self, loader, device: torch.device):
        self.loader, self.device = loader, device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for x, y in self.loader:
            yield (x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last),
                   y.to(self.device, non_blocking=True))


def loader_for(b: Bench, backend: str, res: int):
    """The loader a stage measures: `classic` on the device, or a fasttin backend."""
    if backend == "classic":
        return OnDevice(classic_loader(b, res), b.device)
    return backend_loader(b, backend, res)


def one_pass(b: Bench, loader):
    """A consumer: the images of one pass, ending on the device. The first pass (the warm-up) is a
    whole epoch, run to the iterator's end, so workers are started and idle again; the timed ones
    are whole epochs too unless --batches: a loader left mid-epoch keeps its workers prefetching,
    stealing the cores from the next loader measured."""
    passes = []

    def consume() -> int:
        limit = b.args.batches if passes else 0
        passes.append(1)
        done = batches = 0
        for x, _ in loader:
            x = x.to(b.device, non_blocking=True)
            done, batches = done + len(x), batches + 1
            if limit and batches >= limit:
                break
        return done
    return consume
