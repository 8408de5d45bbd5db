"""ResNet18 for Tiny-ImageNet: torchvision's network, two stems, pretrained-weight mapping, and
the model of a checkpoint (what eval, predict and a resumed run build from one).

The model knows nothing of data: the trainer tells it the class count and the stem. Checkpoints
are storage (fasttin/checkpoint.py); building a model from one happens here.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision.models import ResNet18_Weights, resnet18

from fasttin import checkpoint
from fasttin.checkpoint import CheckpointError
from fasttin.errors import UserError, shown, shown_text
from fasttin.recipes import STEMS, res_problem
from fasttin.shards import name_problem

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
    if not Path(path).is_file():
        raise PretrainedError(f"--pretrained {path}: no such file")
    try:
        obj = checkpoint.read(Path(path))
    except CheckpointError as e:
        raise PretrainedError(f"--pretrained {e}") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PretrainedError(f"--pretrained {path}: holds no state dict")
    bad = nonfinite(obj)
    if bad is not None:
        raise PretrainedError(f"--pretrained {path}: its weights are not finite ({shown(bad)} holds NaN or inf)")
    return _strip(obj)


def nonfinite(sd: dict) -> str | None:
    """The name of the first floating-point tensor of `sd` holding NaN or inf (None: all finite).
    A damaged or diverged file must not pass for a model: its outputs would be NaN."""
    for k, v in sd.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all():
            return k
    return None


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


def initial_weights(model: nn.Module, cfg: dict, *, explicit: bool, log) -> list[str]:
    """Load cfg["pretrained"] into `model`; returns the freshly initialised tensors' names. When the
    recipe (not an explicit flag) asks for ImageNet weights that cannot be had here, the run trains
    from scratch and cfg records why: no figure passes for a pretrained one."""
    if cfg["pretrained"] == "none":
        log("weights: from scratch (pretrained none)")
        return []
    try:
        sd = imagenet_state_dict() if cfg["pretrained"] == "imagenet" else read_state_dict(cfg["pretrained"])
    except PretrainedError as e:
        if cfg["pretrained"] != "imagenet" or explicit:
            raise
        log(f"the ImageNet weights cannot be had here, so {cfg['recipe']} trains from scratch "
            "(recorded as pretrained none; --pretrained PATH uses a local copy)")
        cfg.update(pretrained="none", pretrained_reason=str(e).split(";")[0])
        return []
    fresh = load_pretrained(model, sd, name=f"--pretrained {cfg['pretrained']}")
    log(f"weights from {cfg['pretrained']}; freshly initialised: {', '.join(fresh) or 'nothing'}")
    return fresh


# ---- the model of a checkpoint -------------------------------------------------------------------

def check_fits(ckpt: dict, num_classes: int, stem: str | None = None, where: str = "checkpoint") -> None:
    """The checkpoint's architecture must be this run's: ResNet18, same class count (and stem)."""
    arch = ckpt.get("arch") if isinstance(ckpt.get("arch"), dict) else {}
    if arch.get("name") != "resnet18":
        raise CheckpointError(f"{where} holds a {arch.get('name', 'unknown')} model, not a fasttin resnet18")
    if arch.get("num_classes") != num_classes:
        raise CheckpointError(f"{where} has {arch.get('num_classes')} classes; this data set has {num_classes}")
    if stem is not None and arch.get("stem") != stem:
        raise CheckpointError(f"{where} has the {arch.get('stem')} stem; this run asks for {stem}")




def restore_model(ckpt: dict, device, channels_last: bool = True, where: str = "checkpoint") -> nn.Module:
    """The checkpoint's model, in eval mode on `device`; CheckpointError if it is not a fasttin
    ResNet18 checkpoint (a bare state dict, another model's weights, a damaged entry)."""
    arch = ckpt.get("arch") if isinstance(ckpt.get("arch"), dict) else {}
    if arch.get("name") != "resnet18" or not isinstance(ckpt.get("model"), dict):
        raise CheckpointError(f"{where} is not a fasttin checkpoint (no resnet18 'arch' and 'model' entries)")
    classes, stem = arch.get("num_classes"), arch.get("stem")
    if not isinstance(classes, int) or classes < 1 or stem not in STEMS:
        raise CheckpointError(f"{where}: bad architecture entry (num_classes {classes!r}, stem {stem!r})")
    bad = nonfinite(ckpt["model"])
    if bad is not None:
        raise CheckpointError(f"{where}: its weights are not finite ({shown(bad)} holds NaN or inf): a damaged "
                              "file or a diverged run")
    model = build_model(classes, stem)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:  # missing/unexpected keys or shapes: another model's weights
        detail = [line.strip() for line in str(e).splitlines() if line.strip()][1:2] or [""]
        raise CheckpointError(f"{where}: its weights are not a resnet18 {stem} {classes}-class model's "
                              f"({detail[0][:120]})") from None
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return model.to(device, memory_format=fmt).eval()


def class_names(ckpt: dict, where: str = "checkpoint") -> tuple[list[str], list[str]]:
    """(wnids, words) of the checkpoint's classes, one per output; index names when it has none.
    The lists come from a file, so their shape is checked before anything indexes them.
    The class ids must pass the pack's name rule (they are printed, and written into CSVs): one
    that does not, or a duplicate, is refused. The descriptions ('words') are free text: their
    control characters (escape sequences, newlines) are shown as repr-escapes, so they can
    neither colour a terminal nor forge a line of output."""
    n = ckpt["arch"]["num_classes"]
    wnids = ckpt.get("classes") or [str(i) for i in range(n)]
    words = ckpt.get("words") or [""] * n
    for name, values in (("classes", wnids), ("words", words)):
        if not isinstance(values, list) or len(values) != n or not all(isinstance(v, str) for v in values):
            raise CheckpointError(f"{where}: its '{name}' entry is not a list of {n} names")
    seen = set()
    for wnid in wnids:
        why = name_problem(wnid) or ("is there twice" if wnid in seen else None)
        if why:
            raise CheckpointError(f"{where}: its class {shown(wnid)} {why}; a class id is a bare, unique name")
        seen.add(wnid)
    return wnids, [shown_text(w) for w in words]


def trained_res(ckpt: dict, where: str = "checkpoint") -> int:
    """The resolution the checkpoint was trained at (64 for checkpoints that do not say)."""
    res = ckpt["arch"].get("res", 64)
    why = res_problem(res)
    if why:
        raise CheckpointError(f"{where}: bad 'res' entry in its architecture ({why})")
    return res


@dataclass
class Trained:
    """A checkpoint's model in eval mode, with the classes and resolution it was trained on."""
    model: nn.Module
    wnids: list
    words: list
    res: int
    arch: dict


def from_checkpoint(path, device, *, classes: list | None = None, data="the data",
                    channels_last: bool = True) -> Trained:
    """The model of the fasttin checkpoint at `path` (read as data only) on `device`. With
    `classes` (the data's wnids in order), a checkpoint trained on other classes, or on the
    same ones in another order, is a CheckpointError: its outputs would be misnamed."""
    where = str(path)
    ckpt = checkpoint.load(Path(path))
    model = restore_model(ckpt, device, channels_last=channels_last, where=where)
    wnids, words = class_names(ckpt, where)
    if classes is not None:
        check_fits(ckpt, len(classes), where=where)
        if ckpt.get("classes") and wnids != list(classes):
            raise CheckpointError(f"{where} was trained on other classes (or another order) than {data}")
    return Trained(model, wnids, words, trained_res(ckpt, where), ckpt["arch"])
