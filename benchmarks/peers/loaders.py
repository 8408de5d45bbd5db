"""The peers: one builder per loader, each in its own idiom, run inside a worker process.

A builder takes a Spec and returns a function that yields one epoch of image batches, each an
NCHW view [B, 3, res, res], ImageNet-normalised. The timed form flips and shuffles; the form for
the MAE (spec.limit = N) reads the first N images of the split in pack order, unflipped, as
float32 where the loader can produce it, so the error measured is the kernel's, not rounding.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fasttin.loaders.augment import IMAGENET_MEAN, IMAGENET_STD, SIZE

MEAN_255, STD_255 = np.array(IMAGENET_MEAN) * 255, np.array(IMAGENET_STD) * 255  # ImageNet's, on the 0-255 scale


@dataclass(frozen=True)
class Peer:
    label: str
    kernel: str  # the resampling at res != 64
    half: str  # the half type this loader outputs: "float16", or "any" (the run's --dtype)


PEERS = {
    "fasttin-resident": Peer("fasttin resident", "PIL bicubic (torch antialiased bicubic, uint8 path)", "any"),
    "fasttin-pil": Peer("fasttin pil", "PIL bicubic", "any"),
    "fasttin-dali": Peer("fasttin dali (CPU mode)", "DALI INTERP_CUBIC", "any"),
    "ffcv-raw": Peer("FFCV 1.0.2, raw pixels (RGBImageField write_mode='raw')", "OpenCV INTER_AREA", "float16"),
    "ffcv-jpeg": Peer("FFCV 1.0.2, JPEG (write_mode='jpg', quality 90)", "OpenCV INTER_AREA", "float16"),
    "dali-files": Peer("DALI file reader over an ImageFolder (DALI's idiom, CPU mode)", "DALI INTERP_CUBIC",
                       "float16"),
    "torchvision": Peer("torchvision ImageFolder + DataLoader, bicubic Resize on the fly", "PIL bicubic", "any"),
    "classic": Peer("classic: ImageFolder over files upscaled on disk", "OpenCV INTER_CUBIC, upscaled on disk",
                    "any"),
}
FFCV_JPEG_QUALITY = 90  # FFCV's default


@dataclass(frozen=True)
class Spec:
    peer: str
    data: str
    split: str
    res: int
    batch_size: int
    workers: int
    dtype: str  # float16 | bfloat16 | float32
    cache: str
    folder: str  # the ImageFolder it reads: the 64 px files, or (classic) the files upscaled to res
    flip: bool = True
    shuffle: bool = True
    limit: int | None = None  # the first `limit` images in pack order (MAE form)
    seed: int = 0


def fasttin(spec: Spec, backend: str):
    import torch

    from fasttin.loaders import make_loader
    loader = make_loader(spec.data, spec.split, backend=backend, res=spec.res, batch_size=spec.batch_size,
                         device="cpu", augment="flip" if spec.flip else "none", shuffle=spec.shuffle,
                         drop_last=spec.limit is None, seed=spec.seed, dtype=getattr(torch, spec.dtype),
                         workers=spec.workers)
    return lambda: (x for x, _ in loader)


def ffcv_beton(ds, cache: Path, mode: str, workers: int) -> Path:
    """The split as an FFCV .beton ('raw' or 'jpg' images), written once under a temporary name."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    from benchmarks.pipelines import split_tag
    from fasttin.fileio import write_with
    path = Path(cache) / f"ffcv-{mode}-{split_tag(ds)}.beton"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fields = {"image": RGBImageField(write_mode=mode, jpeg_quality=FFCV_JPEG_QUALITY), "label": IntField()}
        write_with(path, lambda tmp: DatasetWriter(str(tmp), fields, num_workers=workers).from_indexed_dataset(ds))
    return path


def ffcv(spec: Spec, mode: str):
    """decoder -> flip -> NormalizeImage -> ToTensor -> ToTorchImage: NormalizeImage after
    ToTensor/ToTorchImage makes FFCV 1.0.2's Loader hang while it builds (a known FFCV bug)."""
    from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import NormalizeImage, RandomHorizontalFlip, ToTensor, ToTorchImage

    from fasttin.shards import open_split
    path = ffcv_beton(open_split(spec.data, spec.split), Path(spec.cache), mode, spec.workers)
    # at res 64 the images pass as they are; otherwise the whole image (a centre crop of ratio 1)
    # is resized by FFCV's decoder, which uses OpenCV INTER_AREA
    decoder = SimpleRGBImageDecoder() if spec.res == SIZE else CenterCropRGBImageDecoder((spec.res, spec.res), 1.0)
    out = np.float16 if spec.dtype != "float32" else np.float32
    image = [decoder, *([RandomHorizontalFlip()] if spec.flip else []), NormalizeImage(MEAN_255, STD_255, out),
             ToTensor(), ToTorchImage(channels_last=True)]
    loader = Loader(str(path), batch_size=spec.batch_size, num_workers=spec.workers, os_cache=True,
                    order=OrderOption.RANDOM if spec.shuffle else OrderOption.SEQUENTIAL, seed=spec.seed,
                    indices=None if spec.limit is None else np.arange(spec.limit), drop_last=spec.limit is None,
                    pipelines={"image": image, "label": [IntDecoder(), ToTensor()]})
    return lambda: (x for x, _ in loader)


def dali_files(spec: Spec):
    """DALI's own idiom: fn.readers.file over the ImageFolder, decode, resize, crop_mirror_normalize,
    read through DALIGenericIterator."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    from benchmarks.pipelines import relative_paths
    from fasttin.shards import open_split
    files = relative_paths(open_split(spec.data, spec.split))[:spec.limit] if spec.limit else None

    @pipeline_def(batch_size=spec.batch_size, num_threads=spec.workers, device_id=None, seed=spec.seed)
    def pipe():
        jpegs, labels = fn.readers.file(file_root=spec.folder, files=files, random_shuffle=spec.shuffle, name="Reader")
        images = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
        if spec.res != SIZE:
            images = fn.resize(images, size=[spec.res, spec.res], interp_type=types.INTERP_CUBIC)
        images = fn.crop_mirror_normalize(images, dtype=types.FLOAT if spec.dtype == "float32" else types.FLOAT16,
                                          output_layout="HWC", mean=MEAN_255.tolist(), std=STD_255.tolist(),
                                          mirror=fn.random.coin_flip(probability=0.5) if spec.flip else 0)
        return images, labels

    p = pipe()
    p.build()
    policy = LastBatchPolicy.PARTIAL if spec.limit else LastBatchPolicy.DROP
    it = DALIGenericIterator(p, ["images", "labels"], reader_name="Reader", last_batch_policy=policy, auto_reset=True)
    return lambda: (batch[0]["images"].permute(0, 3, 1, 2) for batch in it)


def image_folder(spec: Spec, resize: bool):
    """torchvision's everyday pipeline (pipelines.folder_loader) over spec.folder, normalised,
    resizing on the fly or not."""
    import torchvision.transforms as T

    from benchmarks.pipelines import folder_loader, relative_paths
    from fasttin.shards import open_split
    steps = [T.Resize((spec.res, spec.res), interpolation=T.InterpolationMode.BICUBIC)] if resize else []
    steps += [T.RandomHorizontalFlip()] if spec.flip else []
    # the MAE's form: the first images in pack order, to compare with the reference
    files = relative_paths(open_split(spec.data, spec.split))[:spec.limit] if spec.limit else None
    loader = folder_loader(spec.folder, [*steps, T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)],
                           batch_size=spec.batch_size, workers=spec.workers, shuffle=spec.shuffle,
                           drop_last=spec.limit is None, files=files)
    return lambda: (x for x, _ in loader)


def build(spec: Spec):
    """The peer's epoch function; raises ImportError when the peer is not installed."""
    if spec.peer.startswith("fasttin-"):
        return fasttin(spec, spec.peer.removeprefix("fasttin-"))
    if spec.peer.startswith("ffcv-"):
        return ffcv(spec, {"ffcv-raw": "raw", "ffcv-jpeg": "jpg"}[spec.peer])
    if spec.peer == "dali-files":
        return dali_files(spec)
    if spec.peer in ("torchvision", "classic"):  # the classic pipeline's files are upscaled on disk
        return image_folder(spec, resize=spec.peer == "torchvision" and spec.res != SIZE)
    raise ValueError(f"unknown peer {spec.peer!r}: choose from {', '.join(PEERS)}")


def version(peer: str) -> str:
    """The version of the software that does the loading."""
    if peer.startswith("ffcv"):
        from importlib.metadata import version as dist_version

        import numba
        return f"{dist_version('ffcv')} (numba {numba.__version__})"  # ffcv.__version__ says 0.0.3rc1 in 1.0.2
    name = {"fasttin": "fasttin", "dali": "nvidia.dali"}.get(peer.split("-")[0], "torchvision")  # classic too
    return importlib.import_module(name).__version__
