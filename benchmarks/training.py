"""The model and train stages: fasttin.loop's training step, built from a recipe's resolved
settings, so that "end to end" here is exactly what `fasttin.train` does per step (autocast,
scaler, label smoothing, SGD without decay on norms, the lr schedule, the device-side metrics).

model: the step on one resident random batch, the compute ceiling of each configuration.
train: `loop.train_epoch` over a loader for --steps steps, with its share of that ceiling and the
trainer's own time accounting (StepClock: data wait and compute), which feeds `loop.verdict`.
"""
from __future__ import annotations

import time

import torch

from benchmarks.pipelines import loader_for
from benchmarks.runner import Bench, Skip
from fasttin.loop import AMP_DTYPE, StepClock, make_step, shares, train_epoch
from fasttin.model import build_model
from fasttin.recipes import resolve

PRECISION = {"bf16": "bf16", "fp16": "fp16", "off": "fp32"}


def settings(b: Bench, res: int, **overrides) -> dict:
    """The recipe's settings (--recipe) at this resolution and batch, with a grid point's overrides."""
    cfg = resolve(b.args.recipe, res=res, batch_size=b.args.batch_size)
    cfg.update(overrides)  # after resolve: an override may be None (compile off)
    return cfg


def model_label(cfg: dict) -> str:
    return (f"{cfg['stem']} stem, {PRECISION[cfg['amp']]}, {'NHWC' if cfg['channels_last'] else 'NCHW'}, "
            f"{'compiled' if cfg['compile'] else 'eager'}")


def new_step(b: Bench, cfg: dict, steps_per_epoch: int):
    torch.manual_seed(0)
    model = build_model(len(b.ds.classes), cfg["stem"])
    return make_step(model, cfg, device=b.device, steps_per_epoch=steps_per_epoch)


def model_grid(b: Bench, res: int) -> list[dict]:
    """stem x precision x layout x compile; --quick: the recipe's configuration only. Compiling costs about a
    minute a configuration, so only bf16 NHWC is compiled unless --compile-all. The recipe's own
    configuration is always in the grid: the train stage's ceiling."""
    own = settings(b, res)
    points = []
    for stem in ("imagenet", "cifar"):
        for amp in ("off", "bf16"):
            for cl in (False, True):
                for comp in (None, "default"):
                    if b.args.quick:
                        continue  # the recipe's own configuration only
                    if comp and not b.args.compile_all and (amp, cl) != ("bf16", True):
                        continue
                    points.append(dict(stem=stem, amp=amp, channels_last=cl, compile=comp))
    mine = {k: own[k] for k in ("stem", "amp", "channels_last", "compile")}
    if mine not in points:
        points.append(mine)
    return [{**p, "res": res, "dtype": str(AMP_DTYPE[p["amp"]]).removeprefix("torch.")} for p in points]


def measure_model(b: Bench, res: int, stem: str, amp: str, channels_last: bool, compile, dtype: str) -> dict:
    if b.device.type == "cpu" and compile and not b.args.compile_cpu:
        raise Skip("torch.compile on the CPU takes minutes here; --compile-cpu measures it")
    if b.device.type == "cpu" and stem == "cifar" and res > 64:
        raise Skip(f"cifar stem at res {res} on the CPU: minutes a step")
    cfg = settings(b, res, stem=stem, amp=amp, channels_last=channels_last, compile=compile)
    k, bs = b.args.steps, b.args.batch_size
    step = new_step(b, cfg, steps_per_epoch=k * (b.args.repeats + 2))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(bs, 3, res, res, device=b.device).to(AMP_DTYPE[amp]).contiguous(memory_format=fmt)
    y = torch.randint(0, len(b.ds.classes), (bs,), device=b.device)
    t = time.perf_counter()
    step(x, y)  # the first step apart: it compiles when compiled
    b.sync()
    first = time.perf_counter() - t

    def steps() -> int:
        for _ in range(k):
            step(x, y)
        return k * bs
    return {**b.measure(steps), "first_step_s": first, "recipe": b.args.recipe}


def measure_train(b: Bench, res: int, backend: str) -> dict:
    """loop.train_epoch over the loader, --steps steps a repeat (each repeat starts a new epoch),
    with the trainer's StepClock: the record carries where the timed steps' time went."""
    loader = loader_for(b, backend, res)
    cfg = settings(b, res)
    step = new_step(b, cfg, steps_per_epoch=len(loader))
    clock = StepClock(b.device)
    per = b.args.classic_batch_size if backend == "classic" else b.args.batch_size

    def epoch() -> int:
        _, done = train_epoch(step, loader, clock=clock, max_steps=b.args.steps)
        return done * per
    fields = b.measure(epoch, after_warmup=clock.take)
    times = clock.take()
    return {**fields, **times, **shares(times, sum(times.values())), "batch_size": per, "model": model_label(cfg),
            "recipe": b.args.recipe, "dtype": str(AMP_DTYPE[cfg["amp"]]).removeprefix("torch."),
            "settings": {k: cfg[k] for k in ("amp", "channels_last", "compile", "stem", "augment")}}
