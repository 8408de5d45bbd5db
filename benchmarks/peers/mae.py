"""How far a loader's pixels are from PIL bicubic: the mean absolute error on the 0-255 scale.

The reference is PIL's bicubic resize of the decoded 64 px images (the images themselves at 64).
A loader's output is denormalised, rounded and clipped back to 0-255 first: every loader here
rounds to uint8 before normalising, so the rounding undoes the normalisation exactly and what
remains is the loader's kernel (and decoder), not the arithmetic of its output type.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from fasttin.loaders.augment import IMAGENET_MEAN, IMAGENET_STD, SIZE


def reference(ds, n: int, res: int) -> np.ndarray:
    """uint8 [n, res, res, 3]: the first n images of the split, PIL bicubic to res."""
    out = np.empty((n, res, res, 3), np.uint8)
    for i in range(n):
        im = ds.image(i)
        out[i] = im if res == SIZE else np.asarray(Image.fromarray(im).resize((res, res), Image.BICUBIC))
    return out


def to_pixels(images: torch.Tensor) -> np.ndarray:
    """Normalised [B, 3, H, W] (any float type, any layout) -> float64 [B, H, W, 3] on 0-255,
    rounded and clipped."""
    x = images.float().permute(0, 2, 3, 1).numpy().astype(np.float64)
    x = x * (np.array(IMAGENET_STD) * 255) + np.array(IMAGENET_MEAN) * 255
    return np.clip(np.rint(x), 0, 255)


def mean_abs_error(pixels: np.ndarray, ref: np.ndarray) -> float:
    if pixels.shape != ref.shape:
        raise ValueError(f"loader gave {pixels.shape}, the reference is {ref.shape}")
    return float(np.abs(pixels - ref.astype(np.float64)).mean())
