"""Every setting the trainer reads, declared once (default, type, help), the trainer's flags made
from them, and named sets of defaults.

`SETTINGS` is the one table: `add_flags` makes fasttin.train's flags from it, so every setting has
a flag, and config.json records the resolved values. The choice lists here are the only ones:
the model, the loaders and the step import them. The `seed-*` recipes reproduce the write-up's
stages (its figure beside each); `fast` and `fast-cpu` are fasttin's own: the most accuracy per
minute from scratch, on a GPU and on the CPU.

This module imports nothing heavy, so that a command can check its flags before torch loads.
"""
from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from pathlib import Path

from fasttin.errors import CommandParser, UserError

# pack's --out, train's and eval's --data
DEFAULT_DATA = Path(os.environ.get("FASTTIN_DATA", "data/tiny-imagenet-200-packed"))

STEMS = ("imagenet", "cifar")  # 7x7/2 conv + max-pool; 3x3/1 conv and no max-pool
AUGMENTS = ("none", "flip", "crop", "rrc")  # at 64x64, before the upscale (fasttin/loaders/augment.py)
AMPS = ("bf16", "fp16", "off")  # autocast precisions (fasttin/loop.py maps them to dtypes)
AUTO = "auto"  # a machine-dependent setting left to fasttin/tuning.py
BACKENDS = ("auto", "dali", "resident", "pil")  # data loaders (fasttin/loaders)
SCHEDULES = ("step", "cosine", "linear")
FLOAT32_MAX = 3.4028234663852886e38  # every float setting reaches the step as a float32
MIN_RES, MAX_RES = 16, 512  # the model's smallest useful input; 8x the native 64 px (beyond: memory, no detail)


def res_problem(res) -> str | None:
    """Why `res` is not a resolution fasttin trains, evaluates or benchmarks at (None: it is)."""
    if not isinstance(res, int) or isinstance(res, bool) or not MIN_RES <= res <= MAX_RES:
        return f"a resolution is a whole number from {MIN_RES} to {MAX_RES}, not {res!r}"
    return None


INT_LIMIT = 2**53  # whole-number settings stay below it: exact as floats, where the schedule's arithmetic goes


def shown_number(text) -> str:
    """A number's text as an error line shows it: at most 24 characters of it."""
    text = str(text)
    return text if len(text) <= 24 else f"{text[:10]}...{text[-6:]} ({len(text)} characters)"


class SettingError(UserError):
    """A value a setting refuses (argparse turns it into a one-line usage error)."""


def parse_res_schedule(text: str) -> str:
    """'RES@EPOCH,...' (e.g. '48@1,64@6,80@11'): checked and written back in one spelling."""
    if text in ("", "none"):
        return ""
    entries = []
    for part in text.split(","):
        res, at, epoch = part.strip().partition("@")
        try:
            entries.append((int(res), int(epoch)))
        except ValueError:
            raise SettingError(f"{text!r}: write RES@EPOCH entries, e.g. 48@1,64@6,80@11") from None
        if not at:
            raise SettingError(f"{text!r}: write RES@EPOCH entries, e.g. 48@1,64@6,80@11")
    for res, epoch in entries:
        if res_problem(res) or epoch < 1:
            raise SettingError(f"{text!r}: each RES from {MIN_RES} to {MAX_RES}, each EPOCH at least 1")
    epochs = [e for _, e in entries]
    if epochs != sorted(set(epochs)):
        raise SettingError(f"{text!r}: the epochs must increase")
    return ",".join(f"{r}@{e}" for r, e in entries)


def res_schedule(cfg: dict) -> list[tuple[int, int]]:
    """[(first 0-based epoch, res)]: --res from epoch 0, then each entry of --res-schedule."""
    steps = [(0, cfg["res"])]
    for part in filter(None, cfg.get("res_schedule", "").split(",")):
        res, epoch = part.split("@")
        steps = [s for s in steps if s[0] != int(epoch) - 1] + [(int(epoch) - 1, int(res))]
    return steps


def res_at(cfg: dict, epoch: int) -> int:
    """The training resolution of 0-based `epoch` (of the nominal schedule, under --budget)."""
    return [res for first, res in res_schedule(cfg) if first <= epoch][-1]


def max_res(cfg: dict) -> int:
    return max(res for _, res in res_schedule(cfg))


@dataclass(frozen=True)
class Setting:
    name: str
    default: object
    kind: type  # int | float | str | bool; compile is str or None
    help: str
    choices: tuple | None = None
    minimum: float | None = None  # inclusive lower bound for numbers
    positive: bool = False  # numbers: strictly above 0
    check: object = None  # text -> value, for a value with a syntax of its own (raises SettingError)
    below: float | None = None  # numbers: strictly below this
    maximum: float | None = None  # inclusive upper bound for numbers
    float32: bool = True  # floats: within float32's range (gamma is a factor: its product is checked instead)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def parse(self, text: str):
        """The flag's text as this setting's value; nan, inf and out-of-range numbers are refused."""
        if self.check is not None:
            return self.check(text)
        if self.kind not in (int, float):
            if self.choices and text not in self.choices:
                raise SettingError(f"{text!r}: choose one of {', '.join(self.choices)}")
            return text
        try:
            v = self.kind(text)
        except ValueError:
            raise SettingError(f"{shown_number(text)!r} is not {'an integer' if self.kind is int else 'a number'}") \
                from None
        if self.kind is int and abs(v) >= INT_LIMIT:  # before any arithmetic: float() of it overflows
            raise SettingError(f"{shown_number(text)}: must be below 2**53")
        if not math.isfinite(v) or (self.kind is float and self.float32 and abs(v) > FLOAT32_MAX):
            raise SettingError(f"{text}: must be a finite number" + (" within float32's range (3.4e38)"
                                                                     if math.isfinite(v) else ""))
        if self.positive and v <= 0:
            raise SettingError(f"{text}: must be positive")
        if self.minimum is not None and v < self.minimum:
            raise SettingError(f"{text}: at least {self.minimum:g}")
        if self.maximum is not None and v > self.maximum:
            raise SettingError(f"{text}: at most {self.maximum:g}")
        if self.below is not None and v >= self.below:
            raise SettingError(f"{text}: must be below {self.below:g}" if self.kind is float
                               else f"{text}: at most {self.below - 1}")
        return v


def _eval_res(text: str) -> int:
    v = Setting("eval_res", 0, int, "").parse(text)
    if v != 0 and res_problem(v):
        raise SettingError(f"{text}: 0 (the epoch's training resolution) or from {MIN_RES} to {MAX_RES}")
    return v


def _compile_mode(text: str) -> str:
    """A mode torch.compile knows (its documentation points at torch._inductor.list_mode_options):
    refused here, not by the first step once the run folder is prepared."""
    import torch
    modes = list(torch._inductor.list_mode_options())
    if text not in modes:
        raise SettingError(f"{text!r}: choose one of {', '.join(modes)}")
    return text


SETTINGS: tuple[Setting, ...] = (
    Setting("res", 64, int, "side of the square images the model sees (64 = native; more is a bicubic upscale "
            "on the device)", minimum=MIN_RES, below=MAX_RES + 1),
    Setting("res_schedule", "", str, "progressive resizing: RES@EPOCH entries, e.g. 48@1,64@6,80@11 (epochs "
            "before the first entry train at --res); under --budget the epochs are the nominal schedule's",
            check=parse_res_schedule),
    Setting("eval_res", 0, int, "validation resolution (0: the resolution the epoch trained at)", check=_eval_res),
    Setting("epochs", 15, int, "passes over the training split (under --budget: the nominal schedule that "
            "the budget stretches or shrinks)", positive=True),
    Setting("budget", 0.0, float, "wall-clock minutes for training, validation and checkpoints (set-up "
            "excluded): lr and resolution follow elapsed/budget, and the run ends at the budget with a "
            "validation and a checkpoint (0: off, the schedule runs on epochs)", minimum=0.0),
    Setting("batch_size", 100, int, "global batch (split over torchrun processes)", positive=True),
    Setting("lr", 1e-3, float, "peak learning rate for the global batch", positive=True),
    Setting("momentum", 0.9, float, "SGD momentum", minimum=0.0),
    Setting("nesterov", False, bool, "Nesterov momentum"),
    Setting("weight_decay", 0.0, float, "L2 on conv/linear weights only (never on norms or biases)", minimum=0.0),
    Setting("label_smoothing", 0.0, float, "cross-entropy label smoothing (0 to 1)", minimum=0.0),
    Setting("schedule", "step", str, "step: StepLR(step_size, gamma) per epoch; cosine: warmup then cosine to "
            "0; linear: warmup then a straight line to 0", choices=SCHEDULES),
    Setting("step_size", 7, int, "epochs between lr drops (schedule step)", positive=True),
    Setting("gamma", 0.1, float, "lr factor at each drop (schedule step)", positive=True, float32=False),
    Setting("warmup_epochs", 0.0, float, "linear warmup from 0, in epochs (schedules cosine and linear)",
            minimum=0.0),
    Setting("ema", 0.0, float, "keep an exponential moving average of the weights with this decay per step "
            "(e.g. 0.999), validated beside the raw weights; best.pt holds the better (0: off)",
            minimum=0.0, below=1.0),
    Setting("stem", "imagenet", str, "imagenet: 7x7/2 conv + max-pool; cifar: 3x3/1 conv, no max-pool",
            choices=STEMS),
    Setting("pretrained", "none", str, "none | imagenet | PATH (a fasttin checkpoint or torchvision state dict)"),
    Setting("augment", "flip", str, "augmentation at 64x64, before the upscale", choices=AUGMENTS),
    Setting("mixup", 0.0, float, "MixUp in the step: Beta(ALPHA, ALPHA) weights, each batch blended with itself "
            "reversed, the loss on both labels (0: off; fasttin/mixing.py)", minimum=0.0),
    Setting("cutmix", 0.0, float, "CutMix in the step: Beta(ALPHA, ALPHA) box areas pasted from the batch "
            "reversed, the loss on both labels (0: off; with --mixup too, each mixed batch takes one)", minimum=0.0),
    Setting("mix_share", 1.0, float, "the share of batches --mixup/--cutmix mix (0 to 1)", minimum=0.0, maximum=1.0),
    Setting("tta", False, bool, "also evaluate on mirrored images and average the logits"),
    Setting("amp", AUTO, str, "autocast precision; fp16 adds a gradient scaler (auto: chosen for the device, "
            "bf16 where it has bf16 units or instructions, else fp16 on a GPU and fp32 on a CPU: "
            "fasttin/tuning.py; config.json records the choice and why)", choices=(AUTO, *AMPS)),
    Setting("channels_last", None, bool, "NHWC activations and inputs (left out: chosen for the device, "
            "measured on a CPU in fp32)"),
    Setting("compile", None, str, "torch.compile the model, with an optional mode (e.g. max-autotune)",
            check=_compile_mode),
    Setting("backend", "auto", str, "data loader backend (auto: resident where the split fits in the "
            "device's memory, else dali on a GPU, else pil)", choices=BACKENDS),
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
    # fasttin: from scratch, large batch, one-cycle-like cosine with warmup; aim 60% top-1 (GPU)
    "fast": dict(stem="cifar", epochs=30, batch_size=512, lr=0.4, momentum=0.9, nesterov=True,
                 weight_decay=5e-4, label_smoothing=0.1, schedule="cosine", warmup_epochs=2.0,
                 augment="crop", tta=True),
    # fasttin: the most val top-1 per CPU-minute from scratch with the standard stem. Progressive
    # resizing 64 -> 80 -> 96 upscaled on the fly (on 2 cores 96 px costs only 1.32x of 64 px a step,
    # and gives the standard stem 3x3 final maps instead of 2x2); linear decay to 0, EMA, label
    # smoothing, crop. BENCHMARKS.md: the step's costs, the ablations, the full run.
    "fast-cpu": dict(epochs=10, res=64, res_schedule="80@5,96@8", batch_size=128, lr=0.2, momentum=0.9,
                     nesterov=True, weight_decay=5e-4, label_smoothing=0.1, schedule="linear", warmup_epochs=1.0,
                     ema=0.999, augment="crop"),
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


def check_batch(cfg: dict, world: int, images: int, data) -> None:
    """The global batch splits evenly over the `world` processes and fits in the `images` of the
    train split of `data` (a drop-last epoch would otherwise have no step)."""
    if cfg["batch_size"] % world:
        raise SettingError(f"--batch-size {cfg['batch_size']} does not split over {world} processes")
    if cfg["batch_size"] > images:
        raise SettingError(f"--batch-size {cfg['batch_size']}: more than the {images} training images of {data}")


def _check_lr_range(cfg: dict) -> None:
    """The schedule's largest lr must be a float32: the optimizer cannot even apply a larger one."""
    drops = (cfg["epochs"] - 1) // cfg["step_size"] if cfg["schedule"] == "step" else 0
    log_top = math.log10(cfg["lr"]) + max(0.0, drops * math.log10(cfg["gamma"]))
    if log_top >= math.log10(FLOAT32_MAX):
        raise SettingError(f"--lr {cfg['lr']:g} with --gamma {cfg['gamma']:g} every --step-size {cfg['step_size']} "
                           f"reaches an lr of 1e{log_top:.0f} in {cfg['epochs']} epochs: beyond float32 (3.4e38)")


# ---- flags ----------------------------------------------------------------------------------------

def flag_type(s: Setting):
    """An argparse type for setting `s`: its parse, with errors as argparse's one-line usage errors."""
    def parse(text):
        try:
            return s.parse(text)
        except SettingError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = s.kind.__name__
    return parse


def count(name: str, positive: bool = True, below: int | None = None):
    """An argparse type for a whole number (>= 1, or >= 0 with positive=False; under `below` if
    given), nan and junk refused."""
    return flag_type(Setting(name, None, int, "", positive=positive, minimum=None if positive else 0, below=below))


def add_flags(p: argparse.ArgumentParser) -> None:
    """One flag per setting of the table; its default stays None so the recipe's value applies."""
    for s in SETTINGS:
        if s.kind is bool:
            p.add_argument(s.flag, action=argparse.BooleanOptionalAction, default=None, help=s.help)
        elif s.name == "compile":
            p.add_argument(s.flag, nargs="?", const="default", type=flag_type(s), metavar="MODE", help=s.help)
        else:
            p.add_argument(s.flag, type=flag_type(s), choices=None if s.check else s.choices, help=s.help,
                           metavar=None if s.choices else s.name.upper())


def train_parser(description: str = "") -> CommandParser:
    """fasttin.train's flags: data and recipe, one per setting, then the run's own (where and how it
    runs, never what it computes)."""
    p = CommandParser("fasttin.train", description=description)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="packed data set (python -m fasttin.pack)")
    p.add_argument("--recipe", choices=list(RECIPES),
                   help="named defaults (default: seed-224 at --res 224 or without --res, fast otherwise)")
    add_flags(p)
    run = p.add_argument_group("the run")
    run.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when available")
    run.add_argument("--out", type=Path, help="run folder (default: runs/<recipe>)")
    run.add_argument("--resume", action="store_true", help="continue the run in --out (settings must match)")
    run.add_argument("--auto-resume", action="store_true", help="resume if --out has a last.pt, else start "
                     "fresh: the flag for torchrun --max-restarts and re-invoked jobs")
    run.add_argument("--overwrite", action="store_true", help="start afresh in a folder that holds a run, "
                     "moving the old files into --out/replaced-<time>/")
    run.add_argument("--seed", type=count("seed", positive=False, below=2**32), default=0,
                     help="seed of the model init, data order and augmentation (0 to 2^32-1)")
    run.add_argument("--workers", type=count("workers"), help="loader threads/processes (default: all cores)")
    run.add_argument("--log-every", type=count("log_every"), default=25,
                     help="steps between live-view updates (the only host-device synchronisation in the loop)")
    run.add_argument("--profile", type=count("profile"), metavar="STEPS",
                     help="torch.profiler over STEPS steps after a warm-up: RUN_DIR/profile/trace.json "
                     "(Perfetto, TensorBoard) and top_ops.txt")
    return p


def settings(args) -> dict:
    """The resolved settings of fasttin.train's flags: the table's defaults, the recipe, the flags;
    plus the run's own entries."""
    recipe = args.recipe or ("seed-224" if args.res in (None, 224) else "fast")
    cfg = resolve(recipe, **{s.name: getattr(args, s.name) for s in SETTINGS})
    cfg.update(seed=args.seed, data=str(args.data), out=str(args.out or Path("runs") / recipe),
               workers=args.workers, log_every=args.log_every, profile=args.profile)
    return cfg
