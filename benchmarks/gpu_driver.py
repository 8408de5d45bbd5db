"""python -m benchmarks.gpu_driver: the GPU data path's goals, measured in one call.

One call of a few minutes on a lent GPU, with nothing carried but the tree: it makes its synthetic
data on the machine, stops starting phases at its --deadline, and writes its JSON after every phase
(a cut call still returns what it measured). Phases, most important first:
  1. correctness: the upscale as products (fp16 operands) against the exact one, MAE and max;
  2. per-kernel times (CUDA events, median of 50 batches): gather, today's upscale + normalise,
     the products, rrc's per-sample products;
  3. model-only against end to end, alternated in one rotation, for each variant (today's upscale,
     products, products + side stream, + CUDA graphs), at 64, at 224 and in `fast`'s configuration;
  4. a profile of end-to-end steps at 224 (top CUDA ops);
  5. an epoch of --epoch-images synthetic images at 224;
  6. a checkpoint's cost on the training clock, foreground against background;
  7. compiled points at 64 and 224, with their compile time (torch._dynamo.reset() between them).
It prints a goal table last. On a CPU it runs as a rehearsal (small sizes: --rehearse).
"""
from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fasttin import checkpoint
from fasttin.errors import EXIT_OK, CommandParser, UserError, run_command
from fasttin.fileio import ensure_writable, write_json_atomic
from fasttin.info import environment, resolve_device
from fasttin.loaders import augment, make_loader
from fasttin.loaders.base import Loader
from fasttin.loop import AMP_DTYPE, make_step
from fasttin.model import build_model
from fasttin.pack import pack
from fasttin.recipes import count, resolve

GOALS = {  # issue 31's goals: (what, limit)
    "e2e/model 224": ("end to end / model-only at 224, standard stem, batch 256", 0.98),
    "e2e/model 64": ("end to end / model-only at 64, standard stem, batch 256", 0.98),
    "e2e/model fast": ("end to end / model-only in fast's configuration", 0.98),
    "epoch 224 s": ("seconds of training for 100,000 images at 224", 7.0),
    "checkpoint share": ("checkpoint share of a fast run's wall-clock (background, per epoch)", 0.01),
    "model 64 img/s": ("model-only img/s at 64, standard stem (2026-12-04: 19,880)", 2 * 19880),
}
# (name, res, stem, batch, augment) of the end-to-end configurations
CONFIGS = [("224", 224, "imagenet", 256, "flip"), ("64", 64, "imagenet", 256, "flip"),
           ("fast", 64, "cifar", 512, "crop")]


@contextlib.contextmanager
def variant(name: str):
    """The loader as it was before issue 31 ("today"), or with the products alone ("products"), or
    products and the side stream ("side"); "graphs" is "side" with a CUDA-graphed step."""
    saved = dict(augment.PRODUCT_OPERANDS), Loader.streams
    try:
        if name == "today":
            augment.PRODUCT_OPERANDS.clear()
        if name in ("today", "products"):
            Loader.streams = lambda self: None
        yield
    finally:
        augment.PRODUCT_OPERANDS.clear()
        augment.PRODUCT_OPERANDS.update(saved[0])
        Loader.streams = saved[1]


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, n: int) -> float:
    """Median seconds of `fn` over n calls: CUDA events on a GPU, the clock elsewhere."""
    times = []
    for _ in range(n):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1000)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def phase_correctness(a, device, out: dict) -> None:
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (a.batch, 64, 64, 3), np.uint8))
    rows = []
    for res in (96, 128, 224):
        for aug in ("none", "flip", "crop", "rrc"):
            boxes, flips = (torch.from_numpy(x) for x in augment.plan(rng, a.batch, aug))
            if aug == "rrc":
                want = augment.resize_boxes(images.double(), boxes.double(), flips, res, torch.float64)
                got = augment.resize_boxes(images.to(device), boxes.to(device), flips.to(device), res, torch.float32)
            else:  # the windows as the gather cuts them: here the whole image, mirrored where planned
                x = torch.where(flips[:, None, None, None], images.flip(2), images).permute(0, 3, 1, 2)
                want = augment.upscale_products(x, res, torch.float64, torch.float64)
                got = augment.upscale_products(x.to(device), res, torch.float32,
                                               augment.PRODUCT_OPERANDS.get(device.type, torch.float32))
            err = (got.double().cpu() - want).abs() * torch.tensor(augment.IMAGENET_STD, dtype=torch.float64)[
                None, :, None, None] * 255
            rows.append({"res": res, "augment": aug, "mae": float(err.mean()), "max": float(err.max())})
    out["correctness"] = rows


def phase_kernels(a, device, out: dict) -> None:
    x = torch.randint(0, 256, (a.batch, 64, 64, 3), dtype=torch.uint8, device=device)
    cl = x.permute(0, 3, 1, 2)
    boxes = torch.tensor([[4.0, 6.0, 50.0, 44.0]], device=device).repeat(a.batch, 1)
    flips = torch.zeros(a.batch, dtype=torch.bool, device=device)
    operand = augment.PRODUCT_OPERANDS.get(device.type, torch.float32)
    kernels = {
        "gather (index_select of rows)": lambda: x.index_select(0, torch.arange(a.batch, device=device).flip(0)),
        "today: upscale + normalise": lambda: augment.normalize(augment.upscale(cl, 224), torch.bfloat16),
        "products, fp16 operands": lambda: augment.upscale_products(cl, 224, torch.bfloat16, operand),
        "rrc products": lambda: augment.resize_boxes(x, boxes, flips, 224, torch.bfloat16),
    }
    out["kernels_ms"] = {k: 1000 * timed(f, device, a.kernel_reps) for k, f in kernels.items()}


def step_for(a, device, res: int, stem: str, batch: int, aug: str, graphs: bool, n_classes: int):
    cfg = resolve("fast" if stem == "cifar" else "seed-64-scratch", res=res, batch_size=batch, augment=aug,
                  amp="bf16" if device.type == "cuda" else "off", channels_last=True,
                  compile="reduce-overhead" if graphs else None)
    torch.manual_seed(0)
    return cfg, make_step(build_model(n_classes, stem), cfg, device=device, steps_per_epoch=1000)


def phase_end_to_end(a, device, data: Path, out: dict, deadline: float) -> None:
    """For each configuration and variant, model-only passes (one resident batch) and end-to-end
    passes (the resident loader) of a.steps steps, alternated, a.repeats rounds; median img/s."""
    rows, warm = [], {}
    for name, res, stem, batch, aug in CONFIGS:
        if a.rehearse:
            res, batch = min(res, 96), a.batch
        points = {}
        for var in ("today", "products", "side", "graphs"):
            if var == "graphs" and device.type != "cuda":
                continue
            with variant(var):
                ld = make_loader(data, "train", backend="resident", res=res, batch_size=batch, device=device,
                                 augment=aug, dtype=AMP_DTYPE["bf16" if device.type == "cuda" else "off"],
                                 drop_last=True)
            cfg, step = step_for(a, device, res, stem, batch, aug, var == "graphs", len(ld.ds.classes))
            x, y = next(iter(ld))
            t = time.perf_counter()
            for _ in range(3):  # compiles and records the graphs where it does: off the timed rounds
                step(x, y)
            sync(device)
            warm[name, var] = time.perf_counter() - t
            points[var] = (ld, step, x, y)
        rates = {(v, kind): [] for v in points for kind in ("model", "e2e")}
        for _ in range(a.repeats):
            for var, (ld, step, x, y) in points.items():
                with variant(var):
                    for kind in ("model", "e2e"):
                        sync(device)
                        t = time.perf_counter()
                        if kind == "model":
                            for _ in range(a.steps):
                                step(x, y)
                        else:
                            it, k = iter(ld), 0
                            while k < a.steps:
                                try:
                                    xb, yb = next(it)
                                except StopIteration:
                                    it = iter(ld)
                                    continue
                                step(xb, yb)
                                k += 1
                        sync(device)
                        rates[var, kind].append(a.steps * batch / (time.perf_counter() - t))
            if time.perf_counter() > deadline:
                break
        for var in points:
            model, e2e = (statistics.median(rates[var, k]) for k in ("model", "e2e"))
            rows.append({"config": name, "res": res, "stem": stem, "batch": batch, "variant": var,
                         "model_img_s": model, "e2e_img_s": e2e, "ratio": e2e / model,
                         "warmup_s": warm[name, var]})
        out["end_to_end"] = rows
        if time.perf_counter() > deadline:
            return


def phase_profile(a, device, data: Path, out: dict) -> None:
    res = 96 if a.rehearse else 224
    ld = make_loader(data, "train", backend="resident", res=res, batch_size=a.batch, device=device, augment="flip",
                     dtype=AMP_DTYPE["bf16" if device.type == "cuda" else "off"], drop_last=True)
    _, step = step_for(a, device, res, "imagenet", a.batch, "flip", False, len(ld.ds.classes))
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                    if device.type == "cuda" else [])
    it = iter(ld)
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(min(a.steps, len(ld))):
            step(*next(it))
        sync(device)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    out["profile_top"] = prof.key_averages().table(sort_by=key, row_limit=15).splitlines()


def phase_epoch(a, device, out: dict, work: Path) -> None:
    n = a.epoch_images // 200
    data = work / "epoch"
    pack(None, data, synthetic=n, classes=200, quiet=True)
    res = 96 if a.rehearse else 224
    ld = make_loader(data, "train", backend="resident", res=res, batch_size=256 if not a.rehearse else a.batch,
                     device=device, augment="flip", dtype=AMP_DTYPE["bf16" if device.type == "cuda" else "off"],
                     drop_last=True)
    _, step = step_for(a, device, res, "imagenet", ld.batch_size, "flip", False, 200)
    step(*next(iter(ld)))  # warm-up
    sync(device)
    t = time.perf_counter()
    images = 0
    for x, y in ld:
        step(x, y)
        images += len(y)
    sync(device)
    out["epoch"] = {"images": images, "res": res, "seconds": time.perf_counter() - t}


def phase_checkpoint(a, device, out: dict, work: Path) -> None:
    """What a save costs the training clock: written in the caller (foreground) against submitted
    to the background saver (the snapshot only), median of 3 each."""
    _, step = step_for(a, device, 64, "cifar", 8, "flip", False, 200)
    state = {"model": step.model.state_dict(), "optimizer": step.optimizer.state_dict()}
    fore, back = [], []
    for _ in range(3):
        t = time.perf_counter()
        checkpoint.Saver(background=False).submit([(work / "fore.pt", state)])
        fore.append(time.perf_counter() - t)
        saver = checkpoint.Saver()
        t = time.perf_counter()
        saver.submit([(work / "back.pt", state)])
        back.append(time.perf_counter() - t)
        saver.wait()
    out["checkpoint_s"] = {"foreground": statistics.median(fore), "background": statistics.median(back),
                           "whole_background_save": saver.longest_s}


def phase_compiled(a, device, out: dict, deadline: float) -> None:
    rows = []
    for res in ((64, 96) if a.rehearse else (64, 224)):
        for mode in ("default", "reduce-overhead"):
            if time.perf_counter() > deadline:
                break
            torch._dynamo.reset()  # each point compiles afresh: no recompile limit carried over
            cfg = resolve("seed-64-scratch", res=res, batch_size=a.batch, compile=mode, channels_last=True,
                          amp="bf16" if device.type == "cuda" else "off")
            torch.manual_seed(0)
            step = make_step(build_model(200, "imagenet"), cfg, device=device, steps_per_epoch=1000)
            x = torch.randn(a.batch, 3, res, res, device=device).contiguous(memory_format=torch.channels_last)
            y = torch.randint(0, 200, (a.batch,), device=device)
            t = time.perf_counter()
            step(x, y)
            sync(device)
            compile_s = time.perf_counter() - t
            per = timed(lambda: step(x, y), device, a.steps)
            rows.append({"res": res, "mode": mode, "compile_s": compile_s, "img_s": a.batch / per})
    out["compiled"] = rows


def goal_table(out: dict) -> list[str]:
    found = {}
    for r in out.get("end_to_end", []):
        if r["variant"] == ("graphs" if any(x["variant"] == "graphs" for x in out["end_to_end"]) else "side"):
            found[f"e2e/model {r['config']}"] = r["ratio"]
        if r["config"] == "64" and r["variant"] == "today":
            found.setdefault("model 64 img/s", r["model_img_s"])
    if "epoch" in out:
        found["epoch 224 s"] = out["epoch"]["seconds"] * 100_000 / max(out["epoch"]["images"], 1)
    fast = [r["e2e_img_s"] for r in out.get("end_to_end", []) if r["config"] == "fast" and r["variant"] == "side"]
    if fast and "checkpoint_s" in out:  # a save each epoch of fast's 100,000 images, in the background
        saved = out["checkpoint_s"]["background"]
        found["checkpoint share"] = saved / (100_000 / fast[0] + saved)
    lines = ["goal | limit | measured | met"]
    for key, (what, limit) in GOALS.items():
        got = found.get(key)
        low_is_good = key in ("epoch 224 s", "checkpoint share")
        met = None if got is None else (got <= limit if low_is_good else got >= limit)
        lines.append(f"{what} | {limit:g} | {'-' if got is None else f'{got:.4g}'} | "
                     f"{'not measured' if met is None else 'yes' if met else 'no'}")
    return lines


def main(argv=None) -> int:
    p = CommandParser("benchmarks.gpu_driver", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when there is one)")
    p.add_argument("--deadline", type=float, default=460.0, help="seconds after which no phase starts")
    p.add_argument("--rehearse", action="store_true", help="small sizes, for a CPU rehearsal")
    p.add_argument("--steps", type=count("steps"), default=40)
    p.add_argument("--repeats", type=count("repeats"), default=5)
    p.add_argument("--batch", type=count("batch"), default=256)
    p.add_argument("--kernel-reps", type=count("kernel-reps"), default=50)
    p.add_argument("--epoch-images", type=count("epoch-images"), default=100_000)
    p.add_argument("--train-per-class", type=count("train-per-class"), default=100,
                   help="synthetic training images a class for phases 3-4")
    p.add_argument("--skip", default="", help="phases not to run, comma-separated (e.g. compiled: minutes on a CPU)")
    a = p.parse_args(argv)
    skip = {x for x in a.skip.split(",") if x}

    def body() -> int:
        ensure_writable(a.json)
        start, device = time.perf_counter(), resolve_device(a.device)
        deadline = start + a.deadline
        out = {"environment": environment(), "device": str(device), "phases": {}}
        with tempfile.TemporaryDirectory(prefix="fasttin-gpu-driver-") as tmp:
            work = Path(tmp)
            data = work / "train"
            phases = [("correctness", lambda: phase_correctness(a, device, out)),
                      ("kernels", lambda: phase_kernels(a, device, out)),
                      ("data", lambda: pack(None, data, synthetic=a.train_per_class, classes=200, quiet=True)),
                      ("end_to_end", lambda: phase_end_to_end(a, device, data, out, deadline)),
                      ("profile", lambda: phase_profile(a, device, data, out)),
                      ("epoch", lambda: phase_epoch(a, device, out, work)),
                      ("checkpoint", lambda: phase_checkpoint(a, device, out, work)),
                      ("compiled", lambda: phase_compiled(a, device, out, deadline))]
            unknown = skip - {name for name, _ in phases}
            if unknown:
                raise UserError(f"--skip: no phase {sorted(unknown)[0]!r} (phases: {', '.join(n for n, _ in phases)})")
            for name, run in phases:
                if name in skip:
                    out["phases"][name] = "skipped: --skip"
                    continue
                if time.perf_counter() > deadline:
                    out["phases"][name] = "not started: past the deadline"
                    continue
                t = time.perf_counter()
                try:
                    run()
                    out["phases"][name] = f"done in {time.perf_counter() - t:.1f} s"
                except Exception as e:  # a crash is a finding: record it, go on to the next phase
                    out["phases"][name] = f"failed: {type(e).__name__}: {e}"
                print(f"phase {name}: {out['phases'][name]}", flush=True)
                write_json_atomic(a.json, out)
        out["goals"] = goal_table(out)
        write_json_atomic(a.json, out)
        print("\n".join(out["goals"]))
        return EXIT_OK
    return run_command("benchmarks.gpu_driver", body)


if __name__ == "__main__":
    raise SystemExit(main())
