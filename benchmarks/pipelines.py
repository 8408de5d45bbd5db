"""The loaders the loader and train stages measure, built once a resolution (`Bench.shared`):
fasttin's backends and the classic pipeline (ImageFolder over the split upscaled on disk with
OpenCV); and the split written out as files in --cache, which the classic pipeline and the peers
read. The reader has checked every class and sample name a bare one, so nothing lands outside the cache.
"""
from __future__ import annotations

import hashlib
import itertools
from pathlib import Path

import torch

from benchmarks.runner import Bench, Skip
from fasttin.errors import UserError
from fasttin.fileio import clean_stale_folders, replace_folder, write_atomic
from fasttin.forking import before_fork
from fasttin.loaders import make_loader
from fasttin.loaders.errors import WorkersStalled
from fasttin.loaders.pil import WORKER_TIMEOUT_S, stall_checked
from fasttin.loop import AMP_DTYPE
from fasttin.machine import usable_cores

# ---- the split as files: the classic pipeline's input, and the peers' -----------------------------

def split_tag(ds) -> str:
    """Names the cache entries of one split: data set folder, split, count, manifest digest."""
    manifest = (ds.data_dir / "manifest.json").read_bytes()
    return f"{ds.data_dir.resolve().name}-{ds.split}-{len(ds)}-{hashlib.sha1(manifest).hexdigest()[:10]}"


def relative_paths(ds) -> list[str]:
    """`class/file` of every sample in pack order: the ImageFolder layout of every cached folder."""
    return [f"{ds.classes[label] if label >= 0 else 'unlabeled'}/"
            f"{key if ds.payload == 'jpeg' else Path(key).stem + '.png'}" for key, label in zip(ds.keys, ds.labels)]


def opencv():
    """cv2, or a Skip that says how to install it: OpenCV is the benchmarks' optional dependency
    (the classic pipeline's upscale, PNG files of raw payloads), so every row that needs it is
    skipped without it, whichever stage it belongs to."""
    try:
        import cv2
    except ImportError as e:
        raise Skip(f"OpenCV is not importable ({e}): pip install -e '.[bench]'") from None
    return cv2


def split_files(ds, cache: Path, upscale: int | None = None) -> Path:
    """The split as an ImageFolder in `cache`, made once (built beside it and swapped in whole, so an
    interrupted preparation is never taken for a finished one): its 64 px files, the JPEG payloads
    byte for byte (PNG for raw payloads), for torchvision's and DALI's file readers; or upscaled to
    `upscale` px on disk with OpenCV INTER_CUBIC, as the write-up did: the classic pipeline's input
    (JPEG at OpenCV's quality 95, or PNG, as the file names say)."""
    cv2 = opencv() if upscale or ds.payload != "jpeg" else None  # before any file is written

    def image(i: int, suffix: str) -> bytes:
        if upscale:
            return _encode(cv2.resize(ds.image(i), (upscale, upscale), interpolation=cv2.INTER_CUBIC), suffix)
        return ds.encoded(i).tobytes() if ds.payload == "jpeg" else _encode(ds.image(i), suffix)

    def write(folder: Path) -> None:
        for i, rel in enumerate(relative_paths(ds)):
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            write_atomic(folder / rel, image(i, Path(rel).suffix), sync=False)  # the folder is swapped in whole
    root = Path(cache) / f"{f'upscaled{upscale}' if upscale else 'folder'}-{split_tag(ds)}"
    root.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_folders(root, lambda p: False)
    if not root.is_dir():
        replace_folder(root, write)
    return root


def _encode(rgb, suffix: str) -> bytes:
    cv2 = opencv()
    ok, data = cv2.imencode(suffix, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise UserError(f"OpenCV cannot encode an image as {suffix}")
    return data.tobytes()


def folder_loader(root: Path, transforms: list, *, batch_size: int, workers: int, shuffle: bool = True,
                  drop_last: bool = True, pin_memory: bool = False, files: list[str] | None = None):
    """torchvision's everyday pipeline, the classic one's and the peers': ImageFolder with per-sample
    `transforms`, a DataLoader of persistent workers; `files` (relative paths) replaces its listing."""
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder
    folder = ImageFolder(str(root), T.Compose(transforms))
    if files is not None:
        folder.samples = folder.imgs = [(str(Path(root) / f), 0) for f in files]
    before_fork()  # its workers are forked at the first pass
    return torch.utils.data.DataLoader(folder, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                                       pin_memory=pin_memory, persistent_workers=True, drop_last=drop_last,
                                       timeout=WORKER_TIMEOUT_S)  # a worker that drops a batch: no endless wait


class OnDevice:
    """A CPU loader's batches moved to the device in the trainer's layout (what fasttin's loaders
    hand out), so the classic pipeline can feed the same training step; a stall is WorkersStalled."""

    def __init__(self, loader, device: torch.device):
        self.loader, self.device = loader, device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for x, y in stall_checked(iter(self.loader), self.loader.timeout, "the classic pipeline's"):
            yield (x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last),
                   y.to(self.device, non_blocking=True))


def loader_for(b: Bench, backend: str, res: int):
    """The loader a stage measures, built once a resolution: fasttin's `backend` at `res` in the
    recipe's precision, as the trainer builds it, or the write-up's pipeline over the split upscaled
    on disk (flip, ToTensor, all cores), its batches moved to the device."""
    import torchvision.transforms as T

    def build():
        if backend == "classic":
            return folder_loader(split_files(b.ds, Path(b.args.cache), upscale=res),
                                 [T.RandomHorizontalFlip(), T.ToTensor()], batch_size=b.args.classic_batch_size,
                                 workers=b.args.workers or usable_cores(), pin_memory=b.device.type == "cuda")
        try:
            return make_loader(b.args.data, b.args.split, backend=backend, res=res, batch_size=b.args.batch_size,
                               device=b.device, augment=b.args.augment, dtype=AMP_DTYPE[b.args.amp], drop_last=True,
                               workers=b.args.workers)
        except (MemoryError, RuntimeError, UserError) as e:  # e.g. the split does not fit on the device
            raise Skip(f"backend {backend} cannot be built here: {e}") from None
    loader = b.shared(("loader", backend, res), build)
    return OnDevice(loader, b.device) if backend == "classic" else loader


def loader_consumer(b: Bench, res: int, backend: str, **_record_fields):
    """The loader stage's consumer: the images of one pass, ending on the device. The first pass
    (the warm-up) is a whole epoch, run to the iterator's end, so workers are started and idle
    again; the timed ones are whole epochs too unless --batches: a loader left mid-epoch keeps its
    workers prefetching, stealing the cores from the next loader measured."""
    loader, passes = loader_for(b, backend, res), []

    def consume() -> int:
        limit = (b.args.batches or None) if passes else None
        passes.append(1)
        done = 0  # x keeps each batch alive while the next is made, as a trainer's loop does
        try:
            for x, _ in itertools.islice(loader, limit):
                x = x.to(b.device, non_blocking=True)
                done += len(x)
        except WorkersStalled as e:  # the pil backend's, or the classic DataLoader's (OnDevice)
            raise Skip(str(e)) from None
        return done
    return consume
