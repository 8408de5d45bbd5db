"""python -m benchmarks.gpu_checks: correctness of the GPU-only paths, checked on the spot.

The dali backend's mixed decoder and GPU resize, and the resident backend on the device, must
agree with DALI's CPU mode (mean absolute error under 1.0 on the 0-255 scale); epochs must be
exact on the device; a few hundred steps of fasttin.loop's training step (a recipe's settings,
exactly as fasttin.train runs it) over each backend must bring the loss down.
On a CPU machine it runs as a rehearsal (device cpu against itself).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fasttin.fileio import write_atomic
from fasttin.loaders import make_loader
from fasttin.loaders.augment import IMAGENET_MEAN, IMAGENET_STD
from fasttin.loop import AMP_DTYPE, make_step, train_epoch
from fasttin.model import build_model
from fasttin.recipes import RECIPES, resolve
from fasttin.shards import open_split


def pixels(x: torch.Tensor) -> np.ndarray:
    x = x.float().permute(0, 2, 3, 1).cpu().numpy()
    return x * np.array(IMAGENET_STD) * 255 + np.array(IMAGENET_MEAN) * 255


def first_batch(data, backend, device, res, augment="none"):
    ld = make_loader(data, "val", backend=backend, res=res, batch_size=64, device=device, shuffle=False,
                     augment=augment, dtype=torch.float32, return_index=True, drop_last=False)
    x, _, idx = next(iter(ld))
    return pixels(x), idx.cpu().numpy()


def check_agreement(data, device, out):
    for res in (64, 224):
        ref, ref_idx = first_batch(data, "dali", "cpu", res)
        for backend in ("dali", "resident"):
            got, idx = first_batch(data, backend, device, res)
            assert (idx == ref_idx).all()
            mae = float(np.abs(got - ref).mean())
            out.append({"check": f"{backend} on {device} vs DALI CPU mode, res {res}", "value": mae,
                        "limit": 1.0, "ok": mae < 1.0})


def check_epochs(data, device, out):
    n = len(open_split(data, "val"))
    for backend in ("dali", "resident"):
        seen = []
        for rank in range(2):
            ld = make_loader(data, "val", backend=backend, res=64, batch_size=100, device=device, rank=rank,
                             world_size=2, drop_last=False, return_index=True, seed=1)
            ld.set_epoch(3)
            seen += [i for _, _, idx in ld for i in idx.cpu().tolist() if i >= 0]
        ok = sorted(seen) == list(range(n))
        out.append({"check": f"{backend} on {device}: exact epoch over 2 ranks", "value": len(seen), "limit": n,
                    "ok": ok})


def check_training(data, device, steps, recipe, out):
    """fasttin.loop's step with the recipe's settings, as fasttin.train runs it, over each backend:
    the mean loss of the last tenth of the steps must be below that of the first tenth."""
    k = max(1, steps // 10)
    for backend in ("dali", "resident", "pil"):
        torch.manual_seed(0)
        cfg = resolve(recipe, res=64, batch_size=128)
        ld = make_loader(data, "train", backend=backend, res=64, batch_size=128, device=device,
                         augment=cfg["augment"], dtype=AMP_DTYPE[cfg["amp"]])
        step = make_step(build_model(len(ld.ds.classes), cfg["stem"]), cfg, device=device, steps_per_epoch=len(ld))
        t, losses = time.perf_counter(), []
        empty = None
        for i in range(max(2, steps // k)):  # chunks of k steps; each train_epoch call is one reading
            metrics, done = train_epoch(step, ld, max_steps=k)
            if done == 0:  # a pass with no batch reads as loss 0: never let it pass for progress
                empty = f"pass {i + 1} yielded no batch"
                break
            losses.append(metrics["loss"])
        out.append({"check": f"{backend} on {device}: {len(losses) * k} steps of the {recipe} step",
                    "value": empty or [losses[0], losses[-1]], "limit": "last < first",
                    "ok": empty is None and bool(losses[-1] < losses[0]), "seconds": time.perf_counter() - t})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_checks", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--recipe", choices=list(RECIPES), default="seed-64-scratch",
                   help="the trainer's settings the training check steps with")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    out: list[dict] = []
    for check in (lambda: check_agreement(args.data, device, out), lambda: check_epochs(args.data, device, out),
                  lambda: check_training(args.data, device, args.steps, args.recipe, out)):
        try:
            check()
        except Exception as e:  # a crash is a finding too: record it and go on
            out.append({"check": "crash", "value": f"{type(e).__name__}: {e}", "ok": False})
    for r in out:
        print(f"{'ok  ' if r['ok'] else 'FAIL'} {r['check']}: {r['value']} (limit {r.get('limit')})")
    if args.json:
        write_atomic(args.json, json.dumps(out, indent=1).encode())
    return 0 if all(r["ok"] for r in out) else 1


if __name__ == "__main__":
    sys.exit(main())
