"""Augmentation, one definition for every backend: plans drawn on the host, applied per backend.

A plan says, for each sample of a batch, which box of the 64x64 image to upscale to `res` and
whether to mirror it. The dali, resident and pil backends all read the same plan, so they differ
only in their resampling arithmetic, never in what they do. The box is in source pixels
(x0, y0, w, h); `crop` boxes may reach 8 px outside the image, where the pixels are black.

Bicubic everywhere, with PIL's conventions (Keys a = -0.5, pixel centres at +0.5, taps outside the
image dropped and the rest renormalised). On the CPU `upscale` resizes whole 64x64 windows with
torch's antialiased bicubic (a port of PIL's algorithm; its uint8 path is bit-exact with PIL); on
CUDA `upscale_products` does it as two matrix products with the normalisation folded in, and
`resize_boxes` the per-sample `rrc` boxes alike, all from the matrices that `cubic_weights` builds,
so the resident backend matches PIL to rounding.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from fasttin.shards import IMAGE_SHAPE

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_PAD = 8  # `crop`: a random 64x64 window of the image padded by this many black pixels
RRC_SCALE = (0.35, 1.0)  # `rrc`: area fraction of the box
RRC_RATIO = (3 / 4, 4 / 3)  # `rrc`: aspect ratio w/h, drawn log-uniformly
SIZE = IMAGE_SHAPE[0]  # the packed images' side


def plan(rng: np.random.Generator, n: int, augment: str) -> tuple[np.ndarray, np.ndarray]:
    """(boxes float32 [n, 4] as x0, y0, w, h; flips bool [n]) for one batch, vectorised."""
    boxes = np.tile(np.array([0, 0, SIZE, SIZE], np.float32), (n, 1))
    if augment == "none":
        return boxes, np.zeros(n, bool)
    flips = rng.random(n) < 0.5
    if augment == "crop":
        boxes[:, :2] = rng.integers(-CROP_PAD, CROP_PAD + 1, (n, 2))
    elif augment == "rrc":
        boxes[:] = _rrc_boxes(rng, n)
    return boxes, flips


def _rrc_boxes(rng: np.random.Generator, n: int, tries: int = 10) -> np.ndarray:
    """torchvision's RandomResizedCrop rule (first of 10 tries that fits, else a centre crop)."""
    area = SIZE * SIZE * rng.uniform(*RRC_SCALE, (n, tries))
    ratio = np.exp(rng.uniform(math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1]), (n, tries)))
    w, h = np.round(np.sqrt(area * ratio)), np.round(np.sqrt(area / ratio))
    ok = (w <= SIZE) & (h <= SIZE) & (w > 0) & (h > 0)
    first = np.where(ok.any(1), ok.argmax(1), -1)
    rows = np.arange(n)
    w, h = np.where(first >= 0, w[rows, first], SIZE), np.where(first >= 0, h[rows, first], SIZE)
    x0 = np.floor(rng.random(n) * (SIZE - w + 1))
    y0 = np.floor(rng.random(n) * (SIZE - h + 1))
    return np.stack([x0, y0, w, h], 1).astype(np.float32)


def _keys_cubic(t: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    t = t.abs()
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return torch.where(t < 1, near, torch.where(t < 2, far, torch.zeros_like(t)))


def cubic_weights(start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int) -> torch.Tensor:
    """[B, out_size, in_size] bicubic interpolation matrices for boxes [start, start + length).

    PIL's rule: output pixel i samples at centre start + (i + 0.5) * scale; when downscaling the
    kernel widens by the scale (antialias); taps that fall outside the input are dropped and the
    remaining weights renormalised, so each row sums to one.
    """
    scale = (length / out_size)[:, None, None]
    centre = start[:, None, None] + (torch.arange(out_size, device=start.device) + 0.5)[None, :, None] * scale
    x = (torch.arange(in_size, device=start.device) + 0.5)[None, None, :]
    w = _keys_cubic((x - centre) / scale.clamp(min=1))
    return w / w.sum(-1, keepdim=True)


_NORM: dict = {}


def _norm_vectors(h: int, w: int, device, work: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position (scale, shift) over one NHWC image, cached: broadcasting a 3-vector over the
    channel axis is several times slower on the CPU than a flat multiply-add against these."""
    key = (h, w, str(device), work)
    if key not in _NORM:
        std = torch.tensor(IMAGENET_STD, device=device) * 255
        mean = torch.tensor(IMAGENET_MEAN, device=device) * 255
        _NORM[key] = ((1 / std).repeat(h * w).to(work), (-mean / std).repeat(h * w).to(work))
    return _NORM[key]


def normalize(x: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """[B, 3, H, W] channels_last (uint8 or float, 0-255) -> ImageNet-normalised `dtype`, channels_last.

    uint8 input: one cast into the output (exact: 0-255 fits bf16 and fp16), then one in-place
    multiply-add in `dtype`, two passes over the output and no temporary. Float input (the rrc and
    CUDA upscales) is computed in float32, then cast once. `out`, contiguous [B, H, W, 3] `dtype`,
    receives the result instead of a new tensor.
    """
    b, c, h, w = x.shape
    nhwc = x.permute(0, 2, 3, 1).reshape(b, h * w * c)  # a view for channels_last input
    if out is None:
        out = torch.empty((b, h, w, c), dtype=dtype, device=x.device)
    flat = out.view(b, h * w * c)
    if x.dtype == torch.uint8:
        scale, shift = _norm_vectors(h, w, x.device, dtype)
        torch.addcmul(shift, flat.copy_(nhwc), scale, out=flat)
    else:
        scale, shift = _norm_vectors(h, w, x.device, torch.float32)
        flat.copy_(torch.addcmul(shift, nhwc.float(), scale))
    return out.permute(0, 3, 1, 2)


def upscale(x: torch.Tensor, res: int) -> torch.Tensor:
    """uint8 [B, 3, 64, 64] channels_last -> [B, 3, res, res] channels_last, 0-255, the same
    bicubic upscale for every sample: torch's antialiased bicubic (PIL's kernel and rules). On the
    CPU its uint8 SIMD path is bit-exact to PIL and stays uint8; on CUDA (a reference for
    `upscale_products`, which the loaders use there) it runs in float."""
    if res == SIZE:
        return x
    x = x if x.device.type == "cpu" else x.float()
    return torch.nn.functional.interpolate(x, size=(res, res), mode="bicubic", antialias=True,
                                           align_corners=False)


# The operands of the upscale's products on each device type: fp16 on CUDA stays within rounding
# (mean error against PIL's float result within 0.15 on the 0-255 scale, tests/test_loaders.py with
# fp16 on the CPU; the prototype: 0.11, and 0.31 with bf16); the CPU keeps the bit-exact
# uint8 path of `upscale`.
PRODUCT_OPERANDS = {"cuda": torch.float16}
_PRODUCTS: dict = {}
_FOLDS: dict = {}


def normalization_fold(res: int, device, operand: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale [3], shift [res*3]) of the normalisation folded into the products, cached on the
    device: each channel's 1/(255 std), and -mean/std repeated over an NHWC row."""
    key = (res, str(device), operand)
    if key not in _FOLDS:
        std, mean = torch.tensor(IMAGENET_STD, dtype=torch.float64), torch.tensor(IMAGENET_MEAN, dtype=torch.float64)
        _FOLDS[key] = ((1 / (255 * std)).to(device, operand), (-mean / std).repeat(res).to(device, operand))
    return _FOLDS[key]


def product_matrices(res: int, device, operand: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cols [192, res*3], rows [res, 64], shift [res*3]) of the whole-window upscale with the
    normalisation folded in, cached: PIL's bicubic is separable, out = Wy X Wx^T per channel, and
    each row of W sums to one, so the channel's 1/(255 std) goes into the column matrix and its
    -mean/std is added once. The column matrix maps one NHWC image row (w, c) to (j, c), so both
    products read and write NHWC: no NCHW temporary and no channel loop."""
    key = (res, str(device), operand)
    if key not in _PRODUCTS:
        w = cubic_weights(torch.zeros(1, dtype=torch.float64), torch.full((1,), float(SIZE), dtype=torch.float64),
                          SIZE, res)[0]  # [res, 64]
        scale, shift = normalization_fold(res, "cpu", torch.float64)
        cols = torch.einsum("jw,c,cd->wcjd", w, scale, torch.eye(3, dtype=torch.float64))
        _PRODUCTS[key] = tuple(t.to(device, operand) for t in (cols.reshape(SIZE * 3, res * 3), w, shift))
    return _PRODUCTS[key]


def upscale_products(x: torch.Tensor, res: int, dtype: torch.dtype, operand: torch.dtype) -> torch.Tensor:
    """uint8 [B, 3, 64, 64] channels_last -> normalize(upscale(x, res), dtype) as two matrix
    products in `operand` precision (float32 accumulation): one [B*64, 192] x [192, res*3] for the
    columns with the scale and shift folded in, one batched [res, 64] x [64, res*3] for the rows,
    then one cast to `dtype` (none when it is `operand`). The same matrices serve the whole batch,
    as the gather has already cropped and mirrored every window."""
    b = x.shape[0]
    cols, rows, shift = product_matrices(res, x.device, operand)
    t = torch.addmm(shift, x.permute(0, 2, 3, 1).reshape(b * SIZE, SIZE * 3).to(operand), cols)
    out = torch.matmul(rows, t.view(b, SIZE, res * 3))  # [B, res, res*3]: NHWC
    return out.to(dtype).view(b, res, res, 3).permute(0, 3, 1, 2)


def resize_boxes(images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, res: int,
                 dtype: torch.dtype) -> torch.Tensor:
    """uint8 NHWC [B, 64, 64, 3] on any device, per-sample `rrc` boxes -> normalised
    [B, 3, res, res] channels_last `dtype`: per-sample interpolation matrices (mirrored where
    asked, each channel's 1/(255 std) folded into the columns' and its shift added once, as in
    `product_matrices`), two batched products in the device's operand precision (float32 on the
    CPU). No loop over samples, nothing read back from the device."""
    b, dev = images.shape[0], images.device
    operand = PRODUCT_OPERANDS.get(dev.type, torch.float32)
    scale, shift = normalization_fold(res, dev, operand)  # cached: no host-to-device copy a batch
    x = images.to(operand).permute(0, 3, 1, 2)  # [B, 3, 64, 64]
    wy = cubic_weights(boxes[:, 1], boxes[:, 3], SIZE, res)  # [B, res, 64]
    wx = cubic_weights(boxes[:, 0], boxes[:, 2], SIZE, res)
    wx = torch.where(flips[:, None, None], wx.flip(1), wx)
    cols = (wx.transpose(1, 2)[:, None] * scale.to(wx.dtype)[None, :, None, None]).to(operand)  # [B, 3, 64, res]
    t = torch.matmul(x, cols)  # columns: [B, 3, 64, res]
    t = t.permute(0, 2, 3, 1).reshape(b, SIZE, res * 3)
    out = torch.baddbmm(shift, wy.to(operand), t)  # rows: [B, res, res*3], NHWC
    return out.to(dtype).view(b, res, res, 3).permute(0, 3, 1, 2)


_POOL: dict[int, ThreadPoolExecutor] = {}
# A slice's upscaled pixels and its output stay within a core's L2, so normalisation's second pass
# reads them from cache, not memory: 4 images a slice at res 224 bf16 (tools/slice_sizes.py
# measures each size; BENCHMARKS.md has the figures and the loader stage before and after).
SLICE_BYTES = 2 << 20


def upscale_normalize(gather: Callable[[torch.Tensor], torch.Tensor], keys: torch.Tensor, res: int,
                      dtype: torch.dtype) -> torch.Tensor:
    """normalize(upscale(gather(keys), res), dtype): gather(k) gives the uint8 [len(k), 3, 64, 64]
    channels_last windows of keys k. On the CPU the batch is cut into slices of keys, and each of
    torch's threads gathers, upscales and normalises one slice at a time straight into the output,
    with torch's intra-op threads set to one meanwhile. Why: torch's uint8 bicubic runs on one core;
    normalising apart re-reads the batch from memory (hence slices that fit a core's L2, SLICE_BYTES);
    and an intra-op parallel op between batches (even the 0.1 ms gather) leaves OpenMP threads
    spinning on the cores the slices need (measured: 6 ms a batch of 100 at res 224). The same
    operations on the same pixels: bit-identical.
    """
    threads, b = torch.get_num_threads(), len(keys)
    operand = PRODUCT_OPERANDS.get(keys.device.type)
    if operand is not None and res != SIZE:
        return upscale_products(gather(keys), res, dtype, operand)
    if keys.device.type != "cpu" or res == SIZE or threads == 1 or b < 2:
        return normalize(upscale(gather(keys), res), dtype)
    out = torch.empty((b, res, res, 3), dtype=dtype)
    per_image = res * res * 3 * (1 + out.element_size())  # its upscaled uint8 and its output
    step = max(1, min(-(-b // (2 * threads)), SLICE_BYTES // per_image))
    pool = _POOL.get(threads) or _POOL.setdefault(threads, ThreadPoolExecutor(threads, "fasttin-upscale"))
    torch.set_num_threads(1)
    try:
        slices = [slice(a, a + step) for a in range(0, b, step)]
        list(pool.map(lambda s: normalize(upscale(gather(keys[s]), res), dtype, out[s]), slices))
    finally:
        torch.set_num_threads(threads)
    return out.permute(0, 3, 1, 2)
