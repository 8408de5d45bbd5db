"""A synthetic data set in the official Tiny-ImageNet layout, for tests and demos without the data.

Each class has its own colour (readable back from the pixels, see `class_of_pixels`) and its own
stripe frequency, so a small network learns it quickly; noise and a random blob keep it from
being trivial. It is written as an ordinary folder and packed by the same code as the real data.
"""
from __future__ import annotations

import colorsys
import io
from pathlib import Path

import numpy as np
from PIL import Image


def wnid(c: int) -> str:
    return f"n{90000000 + c:08d}"


def class_color(c: int, n_classes: int) -> np.ndarray:
    """Well-separated RGB colours: hue walks the circle, value alternates for neighbours."""
    r, g, b = colorsys.hsv_to_rgb(c / n_classes, 0.8, 0.85 if c % 2 else 0.55)
    return np.array([r, g, b]) * 255


def class_of_pixels(images: np.ndarray, n_classes: int) -> np.ndarray:
    """The class whose colour is nearest each image's mean colour ([N, H, W, 3] uint8 or float)."""
    mean = images.reshape(len(images), -1, 3).mean(1)
    palette = np.stack([class_color(c, n_classes) for c in range(n_classes)])
    return np.argmin(((mean[:, None] - palette[None]) ** 2).sum(-1), 1)


def render(c: int, n_classes: int, rng: np.random.Generator) -> bytes:
    yy, xx = np.mgrid[0:64, 0:64]
    img = np.broadcast_to(class_color(c, n_classes), (64, 64, 3)).astype(np.float32)
    freq = 2 + c % 5
    stripes = 18 * np.sin(2 * np.pi * freq * (yy + rng.integers(64)) / 64)
    img = img + stripes[..., None] + rng.normal(0, 10, (64, 64, 3))
    cy, cx, r = rng.integers(8, 56, 2).tolist() + [int(rng.integers(4, 9))]
    blob = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
    img[blob] = img[blob] * 0.6 + rng.integers(0, 255, 3) * 0.4
    out = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()


def make_layout(root: str | Path, n_classes: int, per_class: int, val_per_class: int | None = None,
                test_count: int | None = None, seed: int = 0) -> Path:
    """Write a folder `root/tiny-imagenet-200` in the official layout; return it."""
    root = Path(root) / "tiny-imagenet-200"
    val_per_class = val_per_class if val_per_class is not None else max(5, per_class // 5)
    test_count = test_count if test_count is not None else val_per_class * n_classes
    rng = np.random.default_rng(seed)
    wnids = [wnid(c) for c in range(n_classes)]
    (root / "val" / "images").mkdir(parents=True, exist_ok=True)
    (root / "test" / "images").mkdir(parents=True, exist_ok=True)
    (root / "wnids.txt").write_text("".join(w + "\n" for w in wnids))
    (root / "words.txt").write_text("".join(f"{w}\tsynthetic class {c}\n" for c, w in enumerate(wnids)))
    for c, w in enumerate(wnids):
        d = root / "train" / w / "images"
        d.mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            (d / f"{w}_{k}.JPEG").write_bytes(render(c, n_classes, rng))
    notes, k = [], 0
    for c, w in enumerate(wnids):
        for _ in range(val_per_class):
            (root / "val" / "images" / f"val_{k}.JPEG").write_bytes(render(c, n_classes, rng))
            notes.append(f"val_{k}.JPEG\t{w}\t0\t0\t63\t63\n")
            k += 1
    order = rng.permutation(len(notes))  # the official file is not sorted by class either
    (root / "val" / "val_annotations.txt").write_text("".join(notes[i] for i in order))
    for k in range(test_count):
        (root / "test" / "images" / f"test_{k}.JPEG").write_bytes(render(int(rng.integers(n_classes)), n_classes, rng))
    return root
