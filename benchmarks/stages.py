"""The benchmark table: every stage of the pipeline (`table`), what it needs and its grid; the
read, decode, resize and copy consumers (the model, train, accounting and agreement ones are
benchmarks/training.py's, the loaders benchmarks/pipelines.py's, the peers benchmarks/peers/'s).
"""
from __future__ import annotations

import io
import os
import statistics

import numpy as np
import torch

from benchmarks import LOADERS, pipelines, training
from benchmarks.peers import stage as peers
from benchmarks.runner import Bench, Stage, rate
from fasttin.forking import fork_pool
from fasttin.loaders.augment import SIZE
from fasttin.loaders.dali import build_pipeline
from fasttin.loop import AMP_DTYPE
from fasttin.machine import usable_cores

CORES = usable_cores()


# ---- read ----------------------------------------------------------------------------------------

def _drop_page_cache(ds) -> None:
    for m in ds.manifest["splits"][ds.split]["shards"]:
        fd = os.open(ds.data_dir / m["file"], os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # works for clean pages, no root needed
        os.close(fd)


def read_consumer(b: Bench, cold: bool):
    ds = b.ds

    def read() -> int:
        if cold:
            _drop_page_cache(ds)
        for v in ds.encoded_batch(np.arange(len(ds))):
            bytes(v)
        return len(ds)
    return read, {"bytes_per_image": float(ds.payload_bytes.sum()) / len(ds)}


# ---- decode and resize ----------------------------------------------------------------------------

def _pil_decode(chunk) -> int:
    from PIL import Image
    for i in chunk:
        with Image.open(io.BytesIO(_pil_decode.ds.encoded(i))) as im:
            im.convert("RGB").load()
    return len(chunk)


def _sample(b: Bench) -> np.ndarray:
    return np.arange(min(b.args.decode_images, len(b.ds)))


def pil_decode_consumer(b: Bench, cores: int):
    idx = _sample(b)
    _pil_decode.ds = b.ds  # inherited by the forked workers
    if cores == 1:
        return lambda: _pil_decode(idx)
    chunks = np.array_split(idx, cores * 4)
    pool = fork_pool(cores)
    b.on_release(pool.terminate)
    return lambda: sum(pool.map(_pil_decode, chunks))


def dali_consumer(b: Bench, gpu: bool, decode: bool, res: int | None = None):
    """Passes over the dali backend's own graph (`build_pipeline`, augment none, ending in its
    normalisation): decode JPEG payloads, or resize decoded pixels fed as raw payloads. The feed is
    a list, which external_source (cycle="raise") iterates anew each pass."""
    idx = _sample(b)
    bs = min(len(idx), 256)
    batches = [b.ds.encoded_batch(idx[i:i + bs]) if decode else list(b.ds.images(idx[i:i + bs]).reshape(bs, -1))
               for i in range(0, len(idx) // bs * bs, bs)]
    pipe = build_pipeline([[x] for x in batches], payload="jpeg" if decode else "raw", gpu=gpu,
                          res=SIZE if decode else res, augment="none", batch_size=bs, threads=CORES,
                          device_id=(b.device.index or 0) if gpu else None, seed=0)
    pipe.build()

    def run() -> int:
        pipe.reset()
        done = 0
        while True:
            try:
                pipe.run()
            except StopIteration:
                return done
            done += bs
    return run


def pil_resize_consumer(b: Bench, res: int):
    from PIL import Image
    pil = [Image.fromarray(x) for x in b.ds.images(_sample(b))]

    def resize() -> int:
        for im in pil:
            im.resize((res, res), Image.BICUBIC)
        return len(pil)
    return resize


def torch_resize_consumer(b: Bench, res: int, device: str):
    x = torch.from_numpy(b.ds.images(_sample(b))).to(device).permute(0, 3, 1, 2)
    x = x if device == "cpu" else x.float()  # uint8 bicubic is a CPU kernel only

    def resize() -> int:
        torch.nn.functional.interpolate(x, size=(res, res), mode="bicubic", antialias=True)
        return len(x)
    return resize, {"dtype": str(x.dtype).removeprefix("torch.")}


# ---- copy -----------------------------------------------------------------------------------------

def copy_consumer(b: Bench, res: int, pinned: bool):
    bs = b.args.batch_size
    host = torch.empty(bs * 3 * res * res, dtype=torch.uint8, pin_memory=pinned)  # a pil backend's batch

    def copy() -> int:
        host.to("cuda", non_blocking=True)
        return bs
    return copy, {"bytes_per_image": 3 * res * res}


# ---- loaders, peers ---------------------------------------------------------------------------------

LOADER_NEEDS = {"dali": ("dali",)}  # the classic pipeline's OpenCV: pipelines.opencv


def _loader_row(backend: str) -> Stage:
    """A loader's row, one point a resolution, timed in turn with the other loaders; the record notes
    the augmentation, batch and dtype the loader hands out."""
    if backend == "classic":  # flip only, float32 from ToTensor, the write-up's batch
        return Stage("classic", "ImageFolder + OpenCV-upscaled files, loader only", pipelines.loader_consumer,
                     alternate="loaders", grid=lambda b, res: [
                         {"res": res, "backend": backend, "augment": "flip", "dtype": "float32",
                          "batch_size": b.args.classic_batch_size}])
    return Stage("loader", "{backend}, augment {augment}", pipelines.loader_consumer, LOADER_NEEDS.get(backend, ()),
                 alternate="loaders", grid=lambda b, res: [
                     {"res": res, "backend": backend, "augment": b.args.augment,
                      "dtype": str(AMP_DTYPE[b.args.amp]).removeprefix("torch.")}])


def _each(key, values):
    """A grid of one point a value of `key` at each resolution."""
    return lambda b, res: [{"res": res, key: v} for v in values]


def table(backends=LOADERS) -> list[Stage]:
    """Every stage; the loader and train stages for `backends` only."""
    loaders = [k for k in LOADERS if k in backends]
    return [
        Stage("read", "shard payloads, warm page cache", lambda b: read_consumer(b, False), per_res=False),
        Stage("read", "shard payloads, cold (fadvise DONTNEED)", lambda b: read_consumer(b, True), per_res=False),
        Stage("decode", "pillow, 1 core", lambda b: pil_decode_consumer(b, 1), ("jpeg",), per_res=False),
        Stage("decode", f"pillow, {CORES} cores", lambda b: pil_decode_consumer(b, CORES), ("jpeg",), per_res=False),
        Stage("decode", "DALI CPU (+ normalise)", lambda b: dali_consumer(b, False, True), ("jpeg", "dali"),
              per_res=False, fields={"device": "cpu"}),
        Stage("decode", "DALI mixed (GPU) (+ normalise)", lambda b: dali_consumer(b, True, True),
              ("jpeg", "dali", "cuda"), per_res=False, fields={"device": "cuda"}),
        Stage("resize", "pillow(-simd) bicubic, 1 core", pil_resize_consumer),
        Stage("resize", "DALI CPU cubic (+ normalise)", lambda b, res: dali_consumer(b, False, False, res), ("dali",),
              fields={"device": "cpu"}),
        Stage("resize", "DALI GPU cubic (+ normalise)", lambda b, res: dali_consumer(b, True, False, res),
              ("dali", "cuda"), fields={"device": "cuda"}),
        Stage("resize", "torch bicubic (antialias), CPU", lambda b, res: torch_resize_consumer(b, res, "cpu"),
              fields={"device": "cpu"}),
        Stage("resize", "torch bicubic (antialias), GPU", lambda b, res: torch_resize_consumer(b, res, "cuda"),
              ("cuda",), fields={"device": "cuda"}),
        Stage("copy", "host->device batch, {kind}", lambda b, res, kind: copy_consumer(b, res, kind == "pinned"),
              ("cuda",), grid=_each("kind", ("pinned", "pageable")), fields={"device": "cuda", "dtype": "uint8"}),
        Stage("model", training.model_label, training.model_consumer, grid=training.model_grid, alternate="model"),
        *[_loader_row(k) for k in loaders],
        *[Stage("train", f"{k} + the trainer's step", training.train_consumer, LOADER_NEEDS.get(k, ()),
                grid=_each("backend", [k])) for k in loaders],
        peers.stage(),
        Stage("accounting", "the trainer's step, {clock} the time accounting", training.accounting_consumer,
              grid=_each("clock", ("without", "with")), alternate="accounting"),
        *[Stage("agreement", lambda p: f"{p['backend']}: {training.AGREEMENT_SIDES[p['side']]}",
                training.agreement_consumer, LOADER_NEEDS.get(k, ()), alternate="agreement",
                grid=lambda b, res, k=k: [{"res": res, "backend": k, "side": s} for s in training.AGREEMENT_SIDES])
          for k in loaders if k != "classic"],  # the trainer trains on fasttin's loaders only
    ]


def add_ratios(records: list[dict]) -> None:
    """vs_classic on the fastest loader, vs_model on each train record, vs_ffcv_raw on each peer,
    vs_trainer on the agreement's train stage, and the accounting's cost on its 'with' record (the
    ratio of the medians, and the median of the rounds' ratios: sturdier when the speed drifts)."""
    for res in {r["res"] for r in records if r["res"]}:
        done = [r for r in records if r["res"] == res and r.get("img_per_s")]
        acc = {r["clock"]: r for r in done if r["stage"] == "accounting"}
        if len(acc) == 2:
            w, wo = acc["with"], acc["without"]
            w["overhead"] = wo["img_per_s"] / w["img_per_s"] - 1
            w["paired_overhead"] = statistics.median(a / b for a, b in zip(wo["runs"], w["runs"])) - 1
        ffcv = rate(done, stage="peers", backend="ffcv-raw")
        for r in (r for r in done if ffcv and r["stage"] == "peers"):
            r["vs_ffcv_raw"] = r["img_per_s"] / ffcv
        for r in (r for r in done if r["stage"] == "agreement" and r["side"] == "stage"):
            trainer = rate(done, stage="agreement", side="trainer", backend=r["backend"])
            if trainer:
                r["vs_trainer"] = r["img_per_s"] / trainer
        classic = rate(done, stage="classic")
        best = max((r for r in done if r["stage"] == "loader"), key=lambda r: r["img_per_s"], default=None)
        if classic and best:
            best["vs_classic"] = best["img_per_s"] / classic
        for r in (r for r in done if r["stage"] == "train"):
            model = rate(done, stage="model", name=r.get("model"))
            if model:
                r["vs_model"] = r["img_per_s"] / model
