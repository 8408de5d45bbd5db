"""ResNet18 for Tiny-ImageNet: torchvision's network, two stems, and pretrained-weight mapping.

The model knows nothing of data: the trainer tells it the class count and the stem.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from torchvision.models import ResNet18_Weights, resnet18

from fasttin.errors import UserError

STEMS = ("imagenet", "cifar")
log = logging.getLogger("fasttin.model")


class PretrainedError(UserError):
    """Weights that cannot be had or do not fit: the message says what to do instead."""


def build_model(num_classes: int, stem: str = "imagenet") -> nn.Module:
    """torchvision resnet18 (its AdaptiveAvgPool2d(1) head) with `num_classes` outputs.

    stem 'cifar': conv1 3x3 stride 1 padding 1 and no max-pool, so a 64x64 input keeps 4x more
    resolution through the network (the write-up's "ResNet18-FineTune").
    """
    if stem not in STEMS:
        raise ValueError(f"unknown stem {stem!r}: choose {' or '.join(STEMS)}")
    model = resnet18(weights=None, num_classes=num_classes)
    if stem == "cifar":
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    return model


def _strip(sd: dict) -> dict:
    """Drop the wrappers' prefixes (DistributedDataParallel's 'module.', torch.compile's '_orig_mod.')."""
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod."):
            k = k[len(prefix):] if k.startswith(prefix) else k
        out[k] = v
    return out


def imagenet_state_dict() -> dict:
    """torchvision's ImageNet weights, from its cache or downloaded; offline, a PretrainedError."""
    try:
        return ResNet18_Weights.IMAGENET1K_V1.get_state_dict(progress=True, weights_only=True)
    except Exception as e:  # URLError, socket errors, hub errors: all mean "cannot have them here"
        raise PretrainedError(
            f"cannot get torchvision's ImageNet ResNet18 weights ({type(e).__name__}); offline? use "
            "--pretrained none (from scratch) or --pretrained PATH (a fasttin checkpoint or state dict)") from None


def read_state_dict(path: str | Path) -> dict:
    """A plain state dict, or the model weights of a fasttin checkpoint; read as data only
    (`checkpoint.read`: a file that would run code is refused)."""
    from fasttin.checkpoint import CheckpointError, read
    if not Path(path).is_file():
        raise PretrainedError(f"--pretrained {path}: no such file")
    try:
        obj = read(Path(path))
    except CheckpointError as e:
        raise PretrainedError(f"--pretrained {e}") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PretrainedError(f"--pretrained {path}: holds no state dict")
    return _strip(obj)


def load_pretrained(model: nn.Module, sd: dict, name: str = "pretrained") -> list[str]:
    """Copy `sd` into `model`. Tensors whose shapes differ (conv1 when the stem changes, fc when
    the class count does) keep their fresh initialisation and are returned (and logged); a key
    that one side has and the other lacks means another architecture: a PretrainedError."""
    own = model.state_dict()
    sd = _strip(sd)
    ignorable = lambda k: k.endswith("num_batches_tracked")
    unexpected = sorted(k for k in sd if k not in own and not ignorable(k))
    missing = sorted(k for k in own if k not in sd and not ignorable(k))
    if unexpected or missing:
        raise PretrainedError(f"{name} is not a ResNet18 state dict: {len(unexpected)} unexpected keys "
                              f"({', '.join(unexpected[:3])}), {len(missing)} missing ({', '.join(missing[:3])})")
    fresh = sorted(k for k in own if k in sd and sd[k].shape != own[k].shape)
    model.load_state_dict({k: (own[k] if k in fresh else sd[k]) for k in own if k in sd}, strict=False)
    if fresh:
        log.warning("%s: freshly initialised (shape differs): %s", name, ", ".join(fresh))
    return fresh
