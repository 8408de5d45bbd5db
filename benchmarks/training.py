"""The stages that step fasttin.loop's training step, built from a recipe's resolved settings, so
"end to end" here is exactly what `fasttin.train` does per step: model (the compute ceiling), train
(over a loader, with the trainer's time accounting), accounting (what that accounting costs) and
agreement (does the train stage measure what a real `fasttin.train` run does?).
"""
from __future__ import annotations

import contextlib
import itertools
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.pipelines import loader_for
from benchmarks.runner import Bench, Skip
from fasttin import tuning
from fasttin.loop import AMP_DTYPE, StepClock, make_step, shares, train_epoch
from fasttin.model import build_model
from fasttin.recipes import STEMS, resolve
from fasttin.report import read_metrics
from fasttin.shards import open_split

PRECISION = {"bf16": "bf16", "fp16": "fp16", "off": "fp32"}


def settings(b: Bench, res: int, **overrides) -> dict:
    """The recipe's settings (--recipe) at this resolution and batch, with a grid point's overrides."""
    cfg = resolve(b.args.recipe, res=res, batch_size=b.args.batch_size, **b.args.chosen)  # the machine's amp, layout
    cfg.update(overrides)  # after resolve: an override may be None (compile off)
    return cfg


def model_label(cfg: dict) -> str:
    """A model configuration's name (a grid point, or a recipe's settings run with all threads)."""
    return (f"{cfg['stem']} stem, {PRECISION[cfg['amp']]}, {'NHWC' if cfg['channels_last'] else 'NCHW'}, "
            f"{'compiled' if cfg['compile'] else 'eager'}, batch {cfg['batch_size']}, "
            f"{cfg.get('threads') or torch.get_num_threads()} thread(s)")


def new_step(b: Bench, cfg: dict, steps_per_epoch: int):
    torch.manual_seed(0)
    model = build_model(len(b.ds.classes), cfg["stem"])
    return make_step(model, cfg, device=b.device, steps_per_epoch=steps_per_epoch)


def random_batch(b: Bench, cfg: dict, res: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random batch of the step's size and its labels, on the device in the step's precision and layout."""
    bs = cfg["batch_size"]
    fmt = torch.channels_last if cfg["channels_last"] else torch.contiguous_format
    x = torch.randn(bs, 3, res, res, device=b.device).to(AMP_DTYPE[cfg["amp"]]).contiguous(memory_format=fmt)
    return x, torch.randint(0, len(b.ds.classes), (bs,), device=b.device)


def model_grid(b: Bench, res: int) -> list[dict]:
    """stem (--stems) x precision x layout x compile (--compiled) x batch (--batch-sizes) x threads
    (--threads); --quick: the recipe's configuration only. Compiling costs about a minute a
    configuration and shape, so by default only the machine's own precision and layout (bf16 NHWC
    where it has bf16 instructions) is compiled, at --batch-size with all threads. The recipe's own
    configuration there is in every grid but --compiled only: the train stage's ceiling."""
    own, which, default = settings(b, res), b.args.compiled, (b.args.batch_size, torch.get_num_threads())
    sizes = list(dict.fromkeys([*itertools.product(b.args.batch_sizes or [default[0]], b.args.threads or [default[1]]),
                                default]))
    points = []
    configs = itertools.product([s for s in STEMS if s in b.args.stems], ("off", "bf16"), (False, True),
                                (None, "default"))  # stem, precision, NHWC, compile
    for stem, amp, cl, comp in (() if b.args.quick else configs):  # --quick: the recipe's own configuration only
        some = (amp, cl) == (own["amp"], own["channels_last"])  # the machine's own precision and layout
        if {"none": not comp, "some": not comp or some, "all": True, "only": comp and some}[which]:
            points += [(dict(stem=stem, amp=amp, channels_last=cl, compile=comp), *size) for size in sizes
                       if not comp or which == "all" or size == default]
    mine = ({k: own[k] for k in ("stem", "amp", "channels_last", "compile")}, *default)
    if which != "only" and mine not in points:
        points.append(mine)
    return [{**p, "res": res, "batch_size": bs, "threads": t, "dtype": str(AMP_DTYPE[p["amp"]]).removeprefix("torch.")}
            for p, bs, t in points]


@contextlib.contextmanager
def _threads(n: int):
    """torch's intra-op threads set to `n` for the block (a grid point's), then back."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def model_consumer(b: Bench, res: int, stem: str, amp: str, channels_last: bool, compile, dtype: str,
                   batch_size: int, threads: int):
    """The step on one resident random batch: --steps steps a pass, timed in turn with the other
    points of the grid; the first step (it compiles, when compiled) is timed apart."""
    if b.device.type == "cpu" and compile and not b.args.compile_cpu:
        raise Skip("torch.compile on the CPU takes minutes here; --compile-cpu measures it")
    if b.device.type == "cpu" and stem == "cifar" and res > 64:
        raise Skip(f"cifar stem at res {res} on the CPU: minutes a step")
    cfg = settings(b, res, stem=stem, amp=amp, channels_last=channels_last, compile=compile, batch_size=batch_size)
    if compile:  # every point's model shares ResNet.forward's code: room for all their graphs, past
        # dynamo's per-code limit (on 2026-12-04's GPU run it kept recompiling; 224 was never reached)
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    k = b.args.steps
    step = new_step(b, cfg, steps_per_epoch=k * (b.args.repeats + 2))
    x, y = random_batch(b, cfg, res)

    def steps(n: int = k) -> int:
        with _threads(threads):
            for _ in range(n):
                step(x, y)
            b.sync()
        return n * batch_size
    t = time.perf_counter()
    steps(1)
    first = time.perf_counter() - t
    return steps, {"first_step_s": first, "recipe": b.args.recipe, "threads": threads}


def accounting_consumer(b: Bench, res: int, clock: str):
    """The trainer's step over the same resident batches, with the time accounting (StepClock) or
    without it: the accounting stage times the two in turn, so its cost is their ratio. The step
    logs at the trainer's cadence (a meter read every 25 steps) either way, as the trainer does."""
    def build():
        cfg = settings(b, res)
        step = new_step(b, cfg, steps_per_epoch=b.args.steps)
        return step, [random_batch(b, cfg, res) for _ in range(b.args.steps)]
    step, data = b.shared(("accounting", res), build)  # one step and one set of batches for both sides

    def epoch() -> int:
        _, done = train_epoch(step, data, clock=StepClock(b.device) if clock == "with" else None)
        return done * b.args.batch_size
    return epoch


def train_consumer(b: Bench, res: int, backend: str):
    """loop.train_epoch over the loader, --steps steps a pass (each pass starts a new epoch), with
    the trainer's StepClock: the record carries where the timed passes' time went (the warm-up's
    is dropped)."""
    loader = loader_for(b, backend, res)
    cfg = settings(b, res)
    step = new_step(b, cfg, steps_per_epoch=len(loader))
    clock = StepClock(b.device)
    per = b.args.classic_batch_size if backend == "classic" else b.args.batch_size
    steps = []

    def epoch() -> int:
        if len(steps) == 1:
            clock.take()  # the warm-up's times
        _, done = train_epoch(step, loader, clock=clock, max_steps=b.args.steps)
        steps.append(done)
        return done * per

    def accounting() -> dict:
        times = clock.take()
        return {**times, **shares(times, sum(times.values())), "steps": steps[-1]}
    return epoch, {"batch_size": per, "model": model_label(cfg), "recipe": b.args.recipe,
                   "dtype": str(AMP_DTYPE[cfg["amp"]]).removeprefix("torch."),
                   "settings": {k: cfg[k] for k in ("amp", "channels_last", "compile", "stem", "augment")},
                   "faster": tuning.faster(cfg, b.device)}, accounting


def run_module(module: str, *args) -> None:
    """`python -m module args` in a process of its own; a failure skips the row with its last words."""
    r = subprocess.run([sys.executable, "-m", module, *map(str, args)], stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise Skip(f"python -m {module} exited with status {r.returncode}: {last}")


AGREEMENT_SIDES = {"trainer": "fasttin.train, its last epoch", "stage": "the train stage, an epoch's steps"}


def agreement_consumer(b: Bench, res: int, backend: str, side: str):
    """One round of a side, timed by the process's own clock: `fasttin.train` for --trainer-epochs
    (the last one is timed: its train_img_s), or `benchmarks.run --stages train` over the steps of
    one epoch of the same train split (one timed repeat after its warm-up)."""
    per = b.args.batch_size
    try:
        steps = len(open_split(b.args.data, "train")) // per
    except (OSError, ValueError) as e:  # FormatError included: a pack without a train split
        raise Skip(f"no train split to train on: {e}") from None
    if steps < 1:
        raise Skip(f"--batch-size {per}: larger than the train split of {b.args.data}")

    def make_folder() -> Path:  # the runs' outputs, removed with the resolution
        path = Path(tempfile.mkdtemp(prefix="fasttin-agreement-"))
        b.on_release(lambda: shutil.rmtree(path, ignore_errors=True))
        return path
    folder = b.shared(("agreement", "folder"), make_folder)
    common = ["--data", b.args.data, "--recipe", b.args.recipe, "--res", res, "--batch-size", per,
              "--device", b.args.device]

    def trainer() -> tuple[int, float]:
        out = folder / f"run-{backend}"
        run_module("fasttin.train", *common, "--backend", backend, "--epochs", b.args.trainer_epochs, "--out", out,
                   "--overwrite")
        row = read_metrics(out / "metrics.jsonl")[-1]
        return row["batches"] * per, row["batches"] * per / row["train_img_s"]

    def stage() -> tuple[int, float]:
        out = folder / f"stage-{backend}.json"
        run_module("benchmarks.run", *common, "--split", "train", "--stages", "train", "--backends", backend,
                   "--steps", steps, "--repeats", 1, "--json", out)
        rec = next(r for r in json.loads(out.read_text())["records"] if r["stage"] == "train")
        if not rec["img_per_s"] or rec["steps"] != steps:
            raise Skip(rec.get("skipped") or f"the train stage took {rec['steps']} steps, not the epoch's {steps}")
        return rec["steps"] * per, rec["steps"] * per / rec["img_per_s"]
    return (trainer if side == "trainer" else stage), {"steps": steps, "trainer_epochs": b.args.trainer_epochs,
                                                        "recipe": b.args.recipe}
