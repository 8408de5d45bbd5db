"""make_loader and its backends on the CPU (DALI in its CPU mode)."""
import gc
import itertools
import logging
import os
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
import torch
from helpers import ROOT, Lines
from PIL import Image

from fasttin.errors import UserError
from fasttin.forking import fork_pool, pool_worker_signals
from fasttin.loaders import PAD_LABEL, DataError, LoaderArgumentError, better_backend, make_loader
from fasttin.loaders import resident as resident_mod
from fasttin.loaders.augment import (
    CROP_PAD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    normalize,
    plan,
    resize_boxes,
    upscale,
    upscale_normalize,
    upscale_products,
)
from fasttin.loaders.errors import DoesNotFit
from fasttin.shards import FormatError, open_split
from fasttin.synthetic import class_of_pixels

BACKENDS = ["resident", "pil", "dali"]


def pixels(images: torch.Tensor) -> np.ndarray:
    """Normalised [B, 3, H, W] -> float 0-255 NHWC numpy."""
    x = images.float().permute(0, 2, 3, 1).numpy()
    return x * np.array(IMAGENET_STD) * 255 + np.array(IMAGENET_MEAN) * 255


def loader(data, split="val", **kw):
    kw = {"device": "cpu", "res": 32, "batch_size": 8, "workers": 1, **kw}
    return make_loader(data, split, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world_size", [1, 3])
@pytest.mark.parametrize("drop_last", [False, True])
def test_exact_epochs_over_ranks(packed, backend, world_size, drop_last):
    n = len(open_split(packed, "val"))  # 50
    seen, counts = [], []
    for rank in range(world_size):
        ld = loader(packed, backend=backend, rank=rank, world_size=world_size, drop_last=drop_last,
                    return_index=True, seed=3)
        ld.set_epoch(2)
        batches = list(ld)
        assert len(batches) == len(ld)
        counts.append(len(batches))
        for images, labels, index in batches:
            assert len(images) == len(labels) == len(index) <= 8
            valid = index >= 0
            assert ((labels == PAD_LABEL) == ~valid).all()
            seen += index[valid].tolist()
    assert len(set(counts)) == 1  # ranks stay in step
    assert len(seen) == len(set(seen))  # never twice
    if drop_last:
        assert len(seen) == n // (8 * world_size) * 8 * world_size
    else:
        assert sorted(seen) == list(range(n))  # nothing dropped


@pytest.mark.parametrize("backend", BACKENDS)
def test_labels_match_pixels(packed, backend):
    ld = loader(packed, "train", backend=backend, augment="flip", return_index=True)
    ds = open_split(packed, "train")
    for images, labels, index in ld:
        assert (labels.numpy() == ds.labels[index.numpy()]).all()
        assert (class_of_pixels(pixels(images), 10) == labels.numpy()).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_layout_dtype_normalisation(packed, backend):
    ds = open_split(packed, "val")
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        ld = loader(packed, backend=backend, res=64, dtype=dtype, shuffle=False, return_index=True)
        images, labels, index = next(iter(ld))
        assert images.shape == (8, 3, 64, 64) and images.dtype == dtype and images.device.type == "cpu"
        assert images.is_contiguous(memory_format=torch.channels_last)
        assert labels.dtype == torch.int64 and index.dtype == torch.int64
        assert index.tolist() == list(range(8))
        ref = (ds.images(index.numpy()) / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
        got = images.float().permute(0, 2, 3, 1).numpy()
        tol = 2e-2 if dtype != torch.float32 else 1e-5
        if backend == "dali":
            tol = max(tol, 2e-2)  # DALI's decoder is libjpeg-turbo too, but normalises in fp16
        assert np.abs(got - ref).mean() < tol


@pytest.mark.parametrize("backend", BACKENDS)
def test_determinism_and_new_order_per_epoch(packed, backend):
    a = loader(packed, "train", backend=backend, augment="rrc", return_index=True, seed=7)
    b = loader(packed, "train", backend=backend, augment="rrc", return_index=True, seed=7)
    ea = [(x, i) for x, _, i in a]
    eb = [(x, i) for x, _, i in b]
    for (xa, ia), (xb, ib) in zip(ea, eb):
        assert torch.equal(ia, ib) and torch.equal(xa, xb)
    second = torch.cat([i for _, _, i in a])  # the next pass is epoch 1: a new order
    assert not torch.equal(second, torch.cat([i for _, i in ea]))
    a.set_epoch(0)
    assert torch.equal(torch.cat([i for _, _, i in a]), torch.cat([i for _, i in ea]))


@pytest.mark.parametrize("backend", ["dali", "pil", "resident"])
def test_bicubic_agrees_with_pil_and_opencv(packed, backend):
    ds = open_split(packed, "val")
    ld = loader(packed, backend=backend, res=224, batch_size=16, shuffle=False, return_index=True,
                dtype=torch.float32)
    images, _, index = next(iter(ld))
    got = pixels(images)
    src = [ds.image(i) for i in index.tolist()]
    pil = np.stack([np.asarray(Image.fromarray(im).resize((224, 224), Image.BICUBIC)) for im in src])
    ocv = np.stack([cv2.resize(im, (224, 224), interpolation=cv2.INTER_CUBIC) for im in src])
    assert np.abs(got - pil).mean() < 1.0
    assert np.abs(got - ocv).mean() < 3.0


@pytest.mark.parametrize("augment", ["none", "flip", "crop"])
@pytest.mark.parametrize("res", [64, 80])
def test_resident_is_bit_exact_with_pil(packed, augment, res):
    """The resident store's gather (crop and flip as an index) and upscale give PIL's pixels
    exactly: the plan's window, mirrored where planned, PIL bicubic."""
    ds = open_split(packed, "train")
    ld = loader(packed, "train", backend="resident", res=res, augment=augment, seed=4, dtype=torch.float32)
    plans = list(ld.sampler.batches(0))
    for (images, _), p in zip(ld, plans):
        got = np.rint(pixels(images)).astype(np.uint8)
        for j, (i, (x0, y0, w, h), flip) in enumerate(zip(p.index, p.boxes.tolist(), p.flips)):
            im = Image.fromarray(ds.image(i)).crop((x0, y0, x0 + w, y0 + h))
            im = im.resize((res, res), Image.BICUBIC) if res != 64 else im
            want = np.asarray(im.transpose(Image.FLIP_LEFT_RIGHT) if flip else im)
            assert np.array_equal(got[j], want), (i, x0, y0, flip)


def exact_upscale(images: np.ndarray, boxes: np.ndarray, flips: np.ndarray, res: int, augment: str) -> np.ndarray:
    """The plan applied one sample at a time by PIL in float ("F" images: no rounding), 0-255 NHWC,
    as the pil backend does: rrc resizes its box of the image (taps beyond the box read the image,
    PIL's box=), the others cut the 64x64 window of the image padded black and resize all of it;
    mirrored where planned."""
    padded = np.pad(images, ((0, 0), (CROP_PAD, CROP_PAD), (CROP_PAD, CROP_PAD), (0, 0))).astype(np.float32)
    out = []
    for im, (x0, y0, w, h), flip in zip(padded, boxes.astype(int).tolist(), flips):
        if augment == "rrc":
            src, box = im[CROP_PAD:-CROP_PAD, CROP_PAD:-CROP_PAD], (x0, y0, x0 + w, y0 + h)
        else:
            src, box = im[y0 + CROP_PAD:y0 + CROP_PAD + h, x0 + CROP_PAD:x0 + CROP_PAD + w], None
        up = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(src[..., c]), "F").resize(
            (res, res), Image.BICUBIC, box=box)) for c in range(3)], -1)
        out.append(up[:, ::-1] if flip else up)
    return np.stack(out).astype(np.float64)


def planned(augment: str, res: int, dtype: torch.dtype, n: int = 6):
    """(products' 0-255 NHWC pixels in `dtype` operands, the exact float64 ones) for one batch of
    random images under `augment`'s plan: windows cut and mirrored first for none/flip/crop (as the
    resident gather does), per-sample boxes for rrc."""
    rng = np.random.default_rng(res)
    images = rng.integers(0, 256, (n, 64, 64, 3), np.uint8)
    boxes, flips = plan(rng, n, augment)
    want = exact_upscale(images, boxes, flips, res, augment)
    if augment == "rrc":
        from fasttin.loaders import augment as aug
        with pytest.MonkeyPatch.context() as mp:
            mp.setitem(aug.PRODUCT_OPERANDS, "cpu", dtype)
            got = resize_boxes(torch.from_numpy(images), torch.from_numpy(boxes), torch.from_numpy(flips), res,
                               torch.float32)
    else:
        windows = exact_upscale(images, boxes, flips, 64, augment).round().astype(np.uint8)  # the gather's windows
        got = upscale_products(torch.from_numpy(windows).permute(0, 3, 1, 2), res, torch.float32, dtype)
    return pixels(got), want


@pytest.mark.parametrize("augment", ["none", "flip", "crop", "rrc"])
@pytest.mark.parametrize("res", [80, 96, 128, 224])
def test_the_upscale_as_two_products_is_the_exact_upscale(augment, res):
    """The products with the normalisation folded in give the exact bicubic upscale of the plan's
    window: within 1e-2 (0-255 scale) anywhere with float32 operands, and on average within 0.15
    with the fp16 operands CUDA uses."""
    got, want = planned(augment, res, torch.float32)
    assert got.shape == want.shape == (6, res, res, 3)
    assert np.abs(got - want).max() < 1e-2
    got16, _ = planned(augment, res, torch.float16)
    assert np.abs(got16 - want).mean() <= 0.15
    assert np.abs(got16 - want).max() < 2.0


def test_the_products_write_channels_last_in_the_model_dtype_and_match_the_cpu_path():
    """The CUDA path's output as the model takes it (bf16 channels_last), and on average the pixels
    of the CPU's bit-exact uint8 path (which rounds and saturates between its two passes)."""
    x = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (5, 64, 64, 3), np.uint8)).permute(0, 3, 1, 2)
    got = upscale_products(x, 160, torch.bfloat16, torch.float32)
    assert got.dtype == torch.bfloat16 and got.shape == (5, 3, 160, 160)
    assert got.is_contiguous(memory_format=torch.channels_last)
    cpu = pixels(normalize(upscale(x, 160), torch.float32))
    products = pixels(upscale_products(x, 160, torch.float32, torch.float32))
    assert np.abs(products - cpu).mean() < 0.5


def test_store_is_built_the_same_in_chunks():
    images = np.random.default_rng(0).integers(0, 256, (20, 64, 64, 3), np.uint8)
    for copies, side in [(1, 64), (2, 64), (2, 80)]:
        a = resident_mod.build_store(images, copies, side, torch.device("cpu"), chunk=7)
        b = resident_mod.build_store(images, copies, side, torch.device("cpu"))
        assert torch.equal(a, b)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_threaded_upscale_is_the_plain_one(threads):
    """The CPU's slice-threaded upscale + normalise gives the unthreaded result bit for bit, in
    every half type and for batches that do not split evenly, and gives torch its thread count back
    even when a slice fails."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (7, 64, 64, 3), np.uint8)).permute(0, 3, 1, 2)
        for b, dtype in itertools.product([1, 2, 5, 7], [torch.bfloat16, torch.float16, torch.float32]):
            keys = torch.arange(b).flip(0)  # in any order
            got, want = upscale_normalize(lambda k: x[k], keys, 97, dtype), normalize(upscale(x[keys], 97), dtype)
            assert got.dtype == dtype and got.shape == want.shape == (b, 3, 97, 97)
            assert got.is_contiguous(memory_format=torch.channels_last)
            assert torch.equal(got, want), (b, dtype)
            assert torch.get_num_threads() == threads
        keys = torch.tensor([6, 0, 3, 3, 1, 5, 2, 4, 0])  # at 224 a slice is 4 images (SLICE_BYTES): 4, 4, 1
        assert torch.equal(upscale_normalize(lambda k: x[k], keys, 224, torch.bfloat16),
                           normalize(upscale(x[keys], 224), torch.bfloat16))
        with pytest.raises(RuntimeError):
            upscale_normalize(lambda k: x[k].float().permute(0, 2, 3, 1), torch.arange(7), 97, torch.bfloat16)
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("augment", ["flip", "rrc"])
def test_set_res_changes_the_next_pass_only_and_matches_a_loader_built_at_that_res(packed, backend, augment):
    """Progressive resizing: set_res between passes gives the new shape with exactly the pixels of a
    loader built at that resolution; a pass already started keeps the resolution it started with."""
    ld = loader(packed, backend=backend, res=48, augment=augment)
    it = iter(ld)
    assert next(it)[0].shape == (8, 3, 48, 48)
    ld.set_res(32)
    assert next(it)[0].shape == (8, 3, 48, 48)  # the open pass keeps its resolution
    ld.set_epoch(0)
    got = next(iter(ld))[0]
    ref = next(iter(loader(packed, backend=backend, res=32, augment=augment)))[0]
    assert got.shape == (8, 3, 32, 32) and torch.equal(got, ref)
    with pytest.raises(LoaderArgumentError, match="res"):
        ld.set_res(8)


@pytest.mark.parametrize("augment", ["flip", "crop", "rrc"])
def test_backends_apply_the_same_augmentation(packed, augment):
    outs = {}
    for backend in BACKENDS:
        ld = loader(packed, "train", backend=backend, res=96, batch_size=16, augment=augment, seed=5,
                    dtype=torch.float32)
        outs[backend] = pixels(next(iter(ld))[0])
    for backend in ("pil", "dali"):
        assert np.abs(outs[backend] - outs["resident"]).mean() < 1.5, backend


def test_raw_payload_matches_jpeg(packed, packed_raw):
    for backend in BACKENDS:
        a = next(iter(loader(packed, backend=backend, shuffle=False, dtype=torch.float32)))[0]
        b = next(iter(loader(packed_raw, backend=backend, shuffle=False, dtype=torch.float32)))[0]
        assert np.abs(pixels(a) - pixels(b)).mean() < 0.5, backend


def test_auto_on_cpu_chooses_resident_where_it_fits_else_pil_and_says_why(packed, caplog, monkeypatch):
    with caplog.at_level(logging.INFO, logger="fasttin.loaders"):
        ld = loader(packed, backend="auto")
    assert ld.backend == "resident" and "fits on cpu" in caplog.text
    monkeypatch.setattr(resident_mod, "free_memory", lambda device: 100_000)
    with caplog.at_level(logging.INFO, logger="fasttin.loaders"):
        ld = loader(packed, backend="auto")
    assert ld.backend == "pil" and "does not fit on cpu" in caplog.text and "no GPU" in caplog.text


def test_better_backend_names_auto_s_choice_only_when_it_differs_and_is_not_pil(packed, monkeypatch):
    pil = loader(packed, backend="pil")
    assert better_backend(pil, 64).startswith("the split fits on cpu") and "try --backend resident" in better_backend(
        pil, 64)
    res = loader(packed, backend="resident")
    assert better_backend(res, 64) is None
    monkeypatch.setattr(resident_mod, "free_memory", lambda device: 100_000)
    assert better_backend(pil, 64) is None  # auto would take pil itself: no hint
    assert better_backend(res, 64) is None  # pil is never a better choice


def test_resident_memory_check(packed, monkeypatch):
    monkeypatch.setattr(resident_mod, "free_memory", lambda device: 100_000)
    with pytest.raises(DoesNotFit, match="backend='dali'.*backend='pil'"):
        loader(packed, backend="resident")


@pytest.mark.parametrize("kw, msg", [
    ({"backend": "nope"}, "unknown backend 'nope'"),
    ({"augment": "cutmix"}, "unknown augment 'cutmix'"),
    ({"res": 8}, "res: a resolution is .* not 8"),
    ({"res": 64.0}, "res: a resolution is .* not 64.0"), ({"res": 4096}, "from 16 to 512, not 4096"),
    ({"batch_size": 0}, "batch_size .* got 0"),
    ({"batch_size": True}, "batch_size .* got True"),
    ({"world_size": 0}, "world_size .* got 0"),
    ({"rank": 3, "world_size": 3}, "rank 3 is not in"),
    ({"workers": -1}, "workers .* got -1"),
    ({"dtype": "bf16"}, "dtype must be .* got 'bf16'"),
    ({"dtype": torch.int8}, "dtype must be .* got torch.int8"),
    ({"device": "tpu"}, "unknown device 'tpu'"),
    ({"device": "cuda:x"}, "unknown device 'cuda:x'"),
    ({"device": 3.5}, "unknown device 3.5"),
    ({"device": "meta"}, "unknown device 'meta'"),
    ({"device": "cuda:99"}, "cuda:99' but"),
    ({"batch_size": 64, "world_size": 1}, "50 samples make no batch of 64"),
])
def test_bad_arguments_are_one_line_user_errors(packed, kw, msg):
    with pytest.raises(LoaderArgumentError, match=msg) as e:
        loader(packed, **kw)
    assert isinstance(e.value, UserError) and isinstance(e.value, ValueError)
    assert "\n" not in str(e.value) and e.value.__context__ is None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("damage", ["not an image", "truncated"])
def test_a_payload_that_does_not_decode_names_its_shard_and_sample(packed, tmp_path, backend, damage):
    import shutil
    c = tmp_path / "c"
    shutil.copytree(packed, c)
    ds = open_split(c, "val")
    i = 11
    shard = c / ds.manifest["splits"]["val"]["shards"][ds._shard[i]]["file"]
    data = bytearray(shard.read_bytes())
    a, b = int(ds._start[i]), int(ds._end[i])
    data[a:b] = bytes(b - a) if damage == "not an image" else data[a:a + 40] + bytes(b - a - 40)
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError) as e:
        ld = loader(c, backend=backend, shuffle=False)  # resident decodes here
        for _ in ld:
            pass
    msg = str(e.value)
    assert ds.keys[i] in msg and "\n" not in msg, msg
    assert isinstance(e.value, UserError)


def test_bad_data(packed, tmp_path):
    import shutil
    with pytest.raises(ValueError, match="unknown split 'validation'"):
        loader(packed, "validation")
    with pytest.raises(FileNotFoundError, match="not a packed data set"):
        loader(tmp_path)
    c = tmp_path / "c"
    shutil.copytree(packed, c)
    shard = c / "val-000.shard"
    data = bytearray(shard.read_bytes())
    data[500] ^= 0xFF
    shard.write_bytes(bytes(data))
    loader(c, backend="pil")  # sizes agree: opening is cheap and does not hash (pil decodes lazily)
    with pytest.raises(FormatError, match="sha256"):
        loader(c, verify=True)
    shard.write_bytes(bytes(data[:-1]))
    with pytest.raises(FormatError, match="truncated"):
        loader(c)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="missing shard"):
        loader(c)


def epoch_indices(ld, epoch):
    ld.set_epoch(epoch)
    return [i for _, _, i in ld]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("taken", [0, 1, 5, 6])  # 6 = every batch, the iterator never exhausted
@pytest.mark.parametrize("then", ["next pass", "set_epoch", "unclosed"])
def test_leaving_an_epoch_early_leaves_nothing_stale(packed, backend, taken, then):
    """Any early exit (a break at the last batch included), then a new pass: a whole, correct epoch."""
    ld = loader(packed, backend=backend, return_index=True, seed=2)
    assert len(ld) == 6
    ref = loader(packed, backend="resident", return_index=True, seed=2)
    it = iter(ld)
    assert len(list(itertools.islice(it, taken))) == taken
    if then == "unclosed":  # a new pass while the old generator is still alive, closed afterwards
        got = epoch_indices(ld, 4)
        it.close()
        want = epoch_indices(ref, 4)
    else:
        del it
        if then == "set_epoch":
            ld.set_epoch(4)
            ref.set_epoch(4)
        else:
            ref.set_epoch(1 if taken == 6 else 0)  # handing out the last batch completes the epoch
        got, want = list(ld), list(ref)
        got, want = [i for _, _, i in got], [i for _, _, i in want]
    assert len(got) == 6
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert torch.equal(torch.cat(epoch_indices(ld, 5)), torch.cat(epoch_indices(ref, 5)))


@pytest.mark.parametrize("first", [0, 4, 6])
def test_a_resumed_pass_then_the_next_epoch(packed, first):
    ld = loader(packed, backend="resident", return_index=True, seed=2)
    ld.set_epoch(3, first_batch=first)
    assert len(list(ld)) == 6 - first and ld.epoch == 4
    assert torch.equal(torch.cat([i for _, _, i in ld]), torch.cat(epoch_indices(ld, 4)))


class FakeSide:
    """A stand-in for a loader's CUDA side stream (fasttin/loaders/base.py SideStream) that logs what
    happens on it: batches made inside it, an event recorded per batch, each batch handed over."""

    def __init__(self):
        self.log, self.inside = [], False

    def start(self):
        self.log.append("start")

    def __enter__(self):
        self.inside = True

    def __exit__(self, *exc):
        self.inside = False

    def record(self):
        assert self.inside, "an event recorded off the side stream"
        self.log.append(("made", len([e for e in self.log if e[0] == "made"])))
        return self.log[-1][1]

    def hand(self, batch, event):
        assert not self.inside
        self.log.append(("hand", event))
        return batch


@pytest.mark.parametrize("backend", ["resident", "pil"])
def test_one_batch_ahead_on_a_side_stream_keeps_every_loader_promise(packed, backend, monkeypatch):
    """With the side stream (faked on the CPU), batch k+1 is made before batch k is handed out, each
    batch is handed after its event, and the batches are those made without it: every sample once
    an epoch, a mid-epoch resume exact, a pass left early and the next one clean."""
    plain = loader(packed, "train", backend=backend, return_index=True, seed=3, augment="flip")
    ahead = loader(packed, "train", backend=backend, return_index=True, seed=3, augment="flip")
    side = FakeSide()
    monkeypatch.setattr(ahead, "streams", lambda: side)
    got, want = list(ahead), list(plain)
    n = len(want)
    assert side.log == ["start", ("made", 0), *[e for k in range(1, n) for e in (("made", k), ("hand", k - 1))],
                        ("hand", n - 1)]
    assert all(torch.equal(a, b) for x, y in zip(got, want) for a, b in zip(x, y))
    assert sorted(torch.cat([i for _, _, i in got]).tolist()) == list(range(len(ahead.ds)))
    for ld in (ahead, plain):
        ld.set_epoch(2, first_batch=3)
    assert all(torch.equal(a, b) for x, y in zip(ahead, plain) for a, b in zip(x, y))
    it = iter(ahead)
    next(it)
    del it  # left early: the batch made ahead is dropped with the pass
    ahead.set_epoch(5)
    plain.set_epoch(5)
    assert all(torch.equal(a, b) for x, y in zip(ahead, plain) for a, b in zip(x, y))


SIGNALLED_CONSUMER = """
import signal, sys, time
from fasttin.loaders import make_loader
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append("TERM"))
signal.signal(signal.SIGINT, lambda *a: stop.append("INT"))
ld = make_loader(sys.argv[1], "train", backend="pil", device="cpu", res=32, batch_size=8, workers=2)
n = 0
for images, labels in ld:
    n += 1
    if n == 1:
        print("first batch", flush=True)
        while not stop:  # the trainer's case: the signal arrives mid-epoch, the step goes on
            time.sleep(0.01)
        print("signalled", stop[0], flush=True)
print("epoch done", n, "of", len(ld), "then", len(list(ld)), flush=True)
"""


def test_a_pil_loader_dropped_without_close_stops_its_workers_quietly(packed):
    """Dropped loaders (no close()) are closed at once, their queues whole: before, the cycle
    collector closed them late and a queue's feeder thread printed an EBADF traceback (3 runs in 4)."""
    script = (f"from fasttin.loaders import make_loader\n"
              f"for rank in range(4):\n"
              f"    ld = make_loader({str(packed)!r}, 'val', backend='pil', res=32, batch_size=10, device='cpu', "
              f"rank=rank % 2, world_size=2, drop_last=False, workers=2)\n"
              f"    n = sum(len(x) for x, _ in ld)\n"
              f"print('done')\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "done" and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_this_torch_has_the_private_dataloader_names_the_pil_backend_relies_on():
    """pil.close() stops persistent workers through torch internals (no public way avoids a 5 s
    wait per worker); a torch that renamed them must fail here, not hang or leak workers."""
    from fasttin.loaders.pil import torch_internals_missing
    assert torch_internals_missing() == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_pil_workers_survive_a_signal_to_the_process_group(packed, sig):
    """What `timeout`, Slurm and Ctrl-C do: the signal reaches every process of the group. The
    workers go on; the main process decides to stop, and exits without a traceback or a hang."""
    proc = subprocess.Popen([sys.executable, "-c", SIGNALLED_CONSUMER, str(packed)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    out = Lines(proc.stdout)
    try:
        out.wait("first batch", proc, timeout=300)
        os.killpg(proc.pid, sig)  # the whole group: the main process and both workers
        out.wait("epoch done", proc, timeout=300)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    err = proc.stderr.read()
    assert "Traceback" not in err and "killed by signal" not in err, err
    assert f"signalled {sig.name[3:]}" in out.text()
    assert "epoch done 25 of 25 then 25" in out.text()


@pytest.mark.slow
@pytest.mark.realdata
def test_real_val_bicubic_references(real_packed):
    ds = open_split(real_packed, "val")
    for backend in ("dali", "pil"):
        ld = make_loader(real_packed, "val", backend=backend, res=224, batch_size=64, device="cpu",
                         shuffle=False, return_index=True, dtype=torch.float32)
        images, _, index = next(iter(ld))
        src = [ds.image(i) for i in index.tolist()]
        pil = np.stack([np.asarray(Image.fromarray(im).resize((224, 224), Image.BICUBIC)) for im in src])
        ocv = np.stack([cv2.resize(im, (224, 224), interpolation=cv2.INTER_CUBIC) for im in src])
        assert np.abs(pixels(images) - pil).mean() < 1.0, backend
        assert np.abs(pixels(images) - ocv).mean() < 3.0, backend


def _sleep_as_a_decoding_worker(ready):
    pool_worker_signals()  # the initializer of every forked pool (decode_all's, the packer's, the benchmarks')
    ready.set()
    time.sleep(120)


def test_every_fork_goes_through_forking():
    """One way to fork workers (fasttin/forking.py). A pool made without pool_worker_signals inherits
    the command's SIGTERM handler: Pool.terminate() then printed a worker's traceback (the benchmarks'
    decode stage) or hung (decode_all, once). A fork without a collection first may finalise a
    dropped DALI pipeline in the child, which hangs it: the packer's pool did, in the test suite."""
    import re

    from helpers import ROOT
    text = {f: f.read_text() for d in ("fasttin", "benchmarks") for f in (ROOT / d).rglob("*.py")
            if f.name != "forking.py"}
    # a spawned process (the peers' workers) inherits neither memory nor handlers: nothing to guard
    forks = r"\.Pool\(|gc\.collect\(|os\.fork\(|get_context\((?!\"spawn\")"
    assert [f for f, t in text.items() if re.search(forks, t)] == []
    # fasttin's pil backend and the benchmarks' one ImageFolder builder: a before_fork() per DataLoader
    loaders = {f: len(re.findall(r"DataLoader\(", t)) for f, t in text.items() if "DataLoader(" in t}
    assert len(loaders) >= 2 and [f for f, n in loaders.items() if text[f].count("before_fork()") < n] == []
    pools = [line for t in text.values() for line in t.splitlines() if re.search(r"fork_pool\(\w", line)]
    assert len(pools) >= 3
    for line in pools:  # the default initializer is pool_worker_signals; the packer's calls it
        assert re.search(r"fork_pool\(\w+\)", line) or "_init_worker" in line, line


class _Finaliser:
    """Held only by a reference cycle, so only a collection frees it; writes where it was finalised."""

    def __init__(self, path):
        self.path, self.cycle = path, self

    def __del__(self):
        self.path.write_text(str(os.getpid()))


def _collect(_):
    gc.collect()
    return os.getpid()


def test_a_forked_pool_finalises_the_parents_garbage_in_the_parent(tmp_path):
    """A dropped DALI pipeline finalised in a forked packer's worker hung the suite (its destructor
    waits on threads the child does not have): fork_pool collects in the parent first."""
    where = tmp_path / "finalised-in"
    gc.disable()  # nothing collects the cycle until someone asks
    try:
        _Finaliser(where)
        with fork_pool(2) as pool:
            children = set(pool.map(_collect, range(8)))
        finalised_in = where.read_text() if where.exists() else None  # before the parent collects again
    finally:
        gc.enable()
    assert finalised_in == str(os.getpid()) and os.getpid() not in children


def test_decoding_workers_die_on_sigterm_under_the_trainers_stop_handler():
    """The resident split is decoded by forked workers while the trainer's SIGTERM handler (which
    only records the signal) is installed: inherited, it left a worker that Pool.terminate() could
    not stop, and a run hung at its start. The workers' own signal set-up must undo it."""
    import multiprocessing as mp
    ctx = mp.get_context("fork")
    ready = ctx.Event()
    old = signal.signal(signal.SIGTERM, lambda *a: None)  # as fasttin.ranks.StopRequest does
    proc = ctx.Process(target=_sleep_as_a_decoding_worker, args=(ready,))
    try:
        proc.start()
        assert ready.wait(timeout=120), "the worker never set up its signals"
        proc.terminate()  # SIGTERM, as Pool.terminate() sends it
        proc.join(timeout=120)
        assert proc.exitcode == -signal.SIGTERM, proc.exitcode
    finally:
        signal.signal(signal.SIGTERM, old)
        if proc.is_alive():
            proc.kill()


def test_pil_workers_that_hand_out_no_batch_are_one_line_not_a_hang(packed, monkeypatch):
    """A worker that cannot pass its batch on (a full /dev/shm: torch prints the error and drops the
    batch) left the loader waiting forever; after WORKER_TIMEOUT_S it is a UserError saying why."""
    from fasttin.loaders import pil
    from fasttin.loaders.errors import WorkersStalled
    monkeypatch.setattr(pil, "WORKER_TIMEOUT_S", 1)
    monkeypatch.setattr(pil._Batches, "batch", lambda self, p: time.sleep(600))  # the forked workers inherit it
    ld = make_loader(packed, "val", backend="pil", res=64, batch_size=4, device="cpu", workers=1)

    def hung(*_):  # a guard, so that the old behaviour fails instead of hanging the suite
        raise AssertionError("the loader is still waiting for its workers: no timeout")
    before = signal.signal(signal.SIGALRM, hung)
    signal.alarm(120)
    try:
        with pytest.raises(WorkersStalled, match="no batch for 1 s") as e:
            next(iter(ld))
        assert isinstance(e.value, UserError) and "/dev/shm" in str(e.value)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, before)
        ld.close()
