"""CutMix and MixUp, batch-wise in the training step: after the loader, so every backend gets them.

Each mixed batch is blended with itself reversed (timm's batch mode: sample i with sample B-1-i),
so nothing is gathered and nothing leaves the device. What a step does is drawn on the host from
(seed, step) alone, never from a stream carried along: a resumed run mixes its batches exactly as
an uninterrupted one, and a step costs no host-device synchronisation. The loss is taken on both
labels, weighted by lambda (the share of the image that is each sample's); train accuracy counts
a hit on the label with the larger weight. Off (both alphas 0), the step is today's bit for bit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

STREAM = 0x6D6978  # the mixing's own random stream of (seed, step): "mix"


@dataclass(frozen=True)
class Mix:
    """One step's mixing: `kind` "mixup" or "cutmix", `lam` the weight of each sample's own label,
    `box` (y0, y1, x0, x1) of the patch CutMix pastes from the reversed batch."""
    kind: str
    lam: float
    box: tuple[int, int, int, int] | None = None


@dataclass(frozen=True)
class Mixing:
    """The settings: Beta(alpha, alpha) for each method (0: off), the share of batches mixed, the
    run's seed. With both methods on, each mixed batch takes one of them at even odds."""
    mixup: float = 0.0
    cutmix: float = 0.0
    share: float = 1.0
    seed: int = 0

    @classmethod
    def of(cls, cfg: dict) -> Mixing:
        return cls(cfg.get("mixup", 0.0), cfg.get("cutmix", 0.0), cfg.get("mix_share", 1.0), cfg.get("seed", 0))

    @property
    def on(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    def draw(self, step: int, h: int, w: int) -> Mix | None:
        """Step `step`'s mixing of [B, C, h, w] images, or None for a batch left as it is."""
        if not self.on:
            return None
        rng = np.random.default_rng([self.seed, step, STREAM])
        if rng.random() >= self.share:
            return None
        kinds = [k for k, alpha in (("mixup", self.mixup), ("cutmix", self.cutmix)) if alpha > 0]
        kind = kinds[int(rng.integers(len(kinds)))]
        lam = float(rng.beta(*(2 * [self.mixup if kind == "mixup" else self.cutmix])))
        if kind == "mixup":
            return Mix(kind, lam)
        # CutMix: a box of area (1 - lam) of the image around a uniform centre, clipped to the image;
        # lam is then the share the box leaves to the sample's own pixels
        cut = math.sqrt(1.0 - lam)
        ch, cw = int(h * cut), int(w * cut)
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        return Mix(kind, 1.0 - (y1 - y0) * (x1 - x0) / (h * w), (y0, y1, x0, x1))


def apply(images: torch.Tensor, mix: Mix) -> torch.Tensor:
    """The mixed batch (a new tensor; the loader's batch is left as it was)."""
    other = images.flip(0)
    if mix.kind == "mixup":
        return images * mix.lam + other * (1.0 - mix.lam)
    y0, y1, x0, x1 = mix.box
    out = images.clone()
    out[:, :, y0:y1, x0:x1] = other[:, :, y0:y1, x0:x1]
    return out


def loss(loss_fn, logits: torch.Tensor, labels: torch.Tensor, mix: Mix) -> torch.Tensor:
    """lam * loss on each sample's own label + (1 - lam) * loss on its partner's."""
    return mix.lam * loss_fn(logits, labels) + (1.0 - mix.lam) * loss_fn(logits, labels.flip(0))


def counted_labels(labels: torch.Tensor, mix: Mix) -> torch.Tensor:
    """The labels train accuracy counts a hit on: the one with the larger weight."""
    return labels if mix.lam >= 0.5 else labels.flip(0)
