"""Every setting the trainer reads, declared once (default, type, help), and named sets of defaults.

`SETTINGS` is the one table: fasttin.train generates its flags from it, so every setting has a
flag, and config.json records the resolved values. The `seed-*` recipes reproduce the write-up's
stages (its figure beside each); `fast` is fasttin's own: the most accuracy per minute from scratch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


class SettingError(ValueError):
    """A value a setting refuses (argparse turns it into a one-line usage error)."""


@dataclass(frozen=True)
class Setting:
    name: str
    default: object
    kind: type  # int | float | str | bool; compile is str or None
    help: str
    choices: tuple | None = None
    minimum: float | None = None  # inclusive lower bound for numbers
    positive: bool = False  # numbers: strictly above 0

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def parse(self, text: str):
        """The flag's text as this setting's value; nan, inf and out-of-range numbers are refused."""
        if self.kind not in (int, float):
            if self.choices and text not in self.choices:
                raise SettingError(f"{text!r}: choose one of {', '.join(self.choices)}")
            return text
        try:
            v = self.kind(text)
        except ValueError:
            raise SettingError(f"{text!r} is not {'an integer' if self.kind is int else 'a number'}") from None
        if not math.isfinite(v):
            raise SettingError(f"{text}: must be a finite number")
        if self.positive and v <= 0:
            raise SettingError(f"{text}: must be positive")
        if self.minimum is not None and v < self.minimum:
            raise SettingError(f"{text}: at least {self.minimum:g}")
        return v


_S = Setting
SETTINGS: tuple[Setting, ...] = (
    _S("res", 64, int, "side of the square images the model sees (64 = native; more is a bicubic upscale on "
       "the device)", minimum=16),
    _S("epochs", 15, int, "passes over the training split", positive=True),
    _S("batch_size", 100, int, "global batch (split over torchrun processes)", positive=True),
    _S("lr", 1e-3, float, "peak learning rate for the global batch", positive=True),
    _S("momentum", 0.9, float, "SGD momentum", minimum=0.0),
    _S("nesterov", False, bool, "Nesterov momentum"),
    _S("weight_decay", 0.0, float, "L2 on conv/linear weights only (never on norms or biases)", minimum=0.0),
    _S("label_smoothing", 0.0, float, "cross-entropy label smoothing (0 to 1)", minimum=0.0),
    _S("schedule", "step", str, "step: StepLR(step_size, gamma) per epoch; cosine: warmup then cosine to 0",
       choices=("step", "cosine")),
    _S("step_size", 7, int, "epochs between lr drops (schedule step)", positive=True),
    _S("gamma", 0.1, float, "lr factor at each drop (schedule step)", positive=True),
    _S("warmup_epochs", 0.0, float, "linear warmup from 0, in epochs (schedule cosine)", minimum=0.0),
    _S("stem", "imagenet", str, "imagenet: 7x7/2 conv + max-pool; cifar: 3x3/1 conv, no max-pool",
       choices=("imagenet", "cifar")),
    _S("pretrained", "none", str, "none | imagenet | PATH (a fasttin checkpoint or torchvision state dict)"),
    _S("augment", "flip", str, "augmentation at 64x64, before the upscale", choices=("none", "flip", "crop", "rrc")),
    _S("tta", False, bool, "also evaluate on mirrored images and average the logits"),
    _S("amp", "bf16", str, "autocast precision; fp16 adds a gradient scaler", choices=("bf16", "fp16", "off")),
    _S("channels_last", True, bool, "NHWC activations and inputs (the tensor-core friendly layout)"),
    _S("compile", None, str, "torch.compile the model, with an optional mode (e.g. max-autotune)"),
    _S("backend", "auto", str, "data loader backend (see fasttin.loaders)",
       choices=("auto", "dali", "resident", "pil")),
)
BASE = {s.name: s.default for s in SETTINGS}

RECIPES = {
    # write-up: from scratch at 64px, 25.9% val top-1
    "seed-64-scratch": dict(),
    # write-up: ImageNet weights at 64px, 56.9%
    "seed-64-pretrained": dict(pretrained="imagenet"),
    # write-up: files upscaled on disk to 224px, ImageNet weights, 73.1%
    "seed-224": dict(res=224, pretrained="imagenet", augment="none", epochs=7),
    # write-up: the 224 model trained on at 64px, standard stem, 54.5%
    "seed-224-to-64": dict(pretrained="runs/seed-224/best.pt", epochs=7),
    # write-up: the 224 model at 64px with the cifar stem (conv1 re-initialised), 72.3%
    "seed-finetune": dict(stem="cifar", pretrained="runs/seed-224/best.pt", epochs=7),
    # fasttin: from scratch, large batch, one-cycle-like cosine with warmup; aim 60% top-1
    "fast": dict(stem="cifar", epochs=30, batch_size=512, lr=0.4, momentum=0.9, nesterov=True,
                 weight_decay=5e-4, label_smoothing=0.1, schedule="cosine", warmup_epochs=2.0,
                 augment="crop", tta=True),
}

WRITEUP_TOP1 = {"seed-64-scratch": 0.259, "seed-64-pretrained": 0.569, "seed-224": 0.731,
                "seed-224-to-64": 0.545, "seed-finetune": 0.723}


def resolve(name: str, **overrides) -> dict:
    """BASE, then the recipe, then every override that is not None."""
    if name not in RECIPES:
        raise SettingError(f"unknown recipe {name!r}: choose one of {', '.join(RECIPES)}")
    unknown = set(overrides) - set(BASE)
    if unknown:
        raise SettingError(f"unknown settings {sorted(unknown)}")
    cfg = {**BASE, **RECIPES[name], **{k: v for k, v in overrides.items() if v is not None}, "recipe": name}
    if cfg["label_smoothing"] > 1:
        raise SettingError(f"--label-smoothing {cfg['label_smoothing']}: at most 1")
    _check_lr_range(cfg)
    return cfg


FLOAT32_MAX = 3.4028234663852886e38


def _check_lr_range(cfg: dict) -> None:
    """The schedule's largest lr must be a float32: the optimizer cannot even apply a larger one."""
    drops = (cfg["epochs"] - 1) // cfg["step_size"] if cfg["schedule"] == "step" else 0
    log_top = math.log10(cfg["lr"]) + max(0.0, drops * math.log10(cfg["gamma"]))
    if log_top >= math.log10(FLOAT32_MAX):
        raise SettingError(f"--lr {cfg['lr']:g} with --gamma {cfg['gamma']:g} every --step-size {cfg['step_size']} "
                           f"reaches an lr of 1e{log_top:.0f} in {cfg['epochs']} epochs: beyond float32 (3.4e38)")
