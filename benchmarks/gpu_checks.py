"""python -m benchmarks.gpu_checks: correctness of the device paths, checked on the spot.

- agreement: the resident backend on the device against resident on the CPU (bit-exact with PIL
  bicubic there), and, where DALI imports, the dali backend's mixed decoder and GPU resize against
  DALI's CPU mode: mean absolute error under 1.0 on the 0-255 scale, at res 64 and 224;
- epochs: every sample exactly once over two ranks, for each backend;
- training: a few hundred steps of fasttin.loop's step (a recipe's settings, as fasttin.train runs
  them) over each backend bring the loss down.
A check whose needs are missing (DALI on a machine without it) is recorded as skipped, with the
reason, never as passed. On a CPU machine it runs as a rehearsal (the device is the CPU).
Exit 0 when every check that ran passed, 1 otherwise.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.peers.mae import to_pixels
from fasttin import tuning
from fasttin.errors import EXIT_FAILED_CHECK, EXIT_OK, CommandParser, run_command
from fasttin.fileio import ensure_writable, write_json_atomic
from fasttin.info import resolve_device
from fasttin.loaders import dali, make_loader
from fasttin.loop import AMP_DTYPE, make_step, train_epoch
from fasttin.model import build_model
from fasttin.recipes import RECIPES, count, resolve
from fasttin.shards import open_split

BACKENDS = ("resident", "pil", "dali")


def first_batch(data, backend: str, device, res: int) -> tuple[np.ndarray, np.ndarray]:
    ld = make_loader(data, "val", backend=backend, res=res, batch_size=64, device=device, shuffle=False,
                     dtype=torch.float32, return_index=True, drop_last=False, workers=2)
    x, _, idx = next(iter(ld))
    return to_pixels(x.cpu()), idx.cpu().numpy()


def each_backend(name: str, out: list, backends=BACKENDS):
    """(backend, its check's name) for each backend; a dali check where DALI does not import is
    recorded as skipped, with the reason, instead."""
    for backend in backends:
        why = dali.available() if backend == "dali" else None
        if why:
            out.append({"check": name.format(backend=backend), "value": None, "ok": None, "skipped": why})
        else:
            yield backend, name.format(backend=backend)


def check_agreement(data, device, out: list) -> None:
    """Each backend on `device` against itself on the CPU (resident there is bit-exact with PIL
    bicubic; dali's CPU mode is its reference), on the same samples."""
    for res in (64, 224):
        for backend, name in each_backend(f"{{backend}} on {device} vs {{backend}} on the CPU, res {res}", out,
                                          ("resident", "dali")):
            ref, ref_idx = first_batch(data, backend, "cpu", res)
            got, idx = first_batch(data, backend, device, res)
            mae = float(np.abs(got - ref).mean()) if (idx == ref_idx).all() else float("inf")
            out.append({"check": name, "value": mae, "limit": 1.0, "ok": mae < 1.0})


def check_epochs(data, device, out: list) -> None:
    n = len(open_split(data, "val"))
    for backend, name in each_backend(f"{{backend}} on {device}: exact epoch over 2 ranks", out):
        seen = []
        for rank in range(2):
            ld = make_loader(data, "val", backend=backend, res=64, batch_size=100, device=device, rank=rank,
                             world_size=2, drop_last=False, return_index=True, seed=1, workers=2)
            ld.set_epoch(3)
            seen += [i for _, _, idx in ld for i in idx.cpu().tolist() if i >= 0]
        out.append({"check": name, "value": len(seen), "limit": n, "ok": sorted(seen) == list(range(n))})


def check_training(data, device, steps: int, recipe: str, out: list) -> None:
    """fasttin.loop's step with the recipe's settings over each backend: the mean loss of the last
    tenth of the steps must be below that of the first tenth."""
    k = max(1, steps // 10)
    for backend, name in each_backend(f"{{backend}} on {device}: {steps} steps of the {recipe} step", out):
        torch.manual_seed(0)
        cfg = resolve(recipe, res=64, batch_size=128)
        cfg.update(tuning.choose(cfg["amp"], cfg["channels_last"], device, threads=False).values)
        ld = make_loader(data, "train", backend=backend, res=64, batch_size=128, device=device,
                         augment=cfg["augment"], dtype=AMP_DTYPE[cfg["amp"]], workers=2)
        step = make_step(build_model(len(ld.ds.classes), cfg["stem"]), cfg, device=device, steps_per_epoch=len(ld))
        t, losses, empty = time.perf_counter(), [], None
        for i in range(max(2, steps // k)):  # chunks of k steps; each train_epoch call is one reading
            metrics, done = train_epoch(step, ld, max_steps=k)
            if done == 0:  # a pass with no batch reads as loss 0: never let it pass for progress
                empty = f"pass {i + 1} yielded no batch"
                break
            losses.append(metrics["loss"])
        out.append({"check": name, "value": empty or [losses[0], losses[-1]], "limit": "last < first",
                    "ok": empty is None and bool(losses[-1] < losses[0]), "seconds": time.perf_counter() - t})


def main(argv=None) -> int:
    p = CommandParser("benchmarks.gpu_checks", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when there is one)")
    p.add_argument("--steps", type=count("steps"), default=200)
    p.add_argument("--recipe", choices=list(RECIPES), default="seed-64-scratch",
                   help="the trainer's settings the training check steps with")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    def body() -> int:
        if args.json:
            ensure_writable(args.json)
        device, out = resolve_device(args.device), []
        open_split(args.data, "val")  # a bad --data is one line, before any check
        for check in (lambda: check_agreement(args.data, device, out), lambda: check_epochs(args.data, device, out),
                      lambda: check_training(args.data, device, args.steps, args.recipe, out)):
            try:
                check()
            except Exception as e:  # a crash is a finding too: record it and go on
                out.append({"check": "crash", "value": f"{type(e).__name__}: {e}", "ok": False})
        for r in out:
            verdict = "skip" if r["ok"] is None else "ok  " if r["ok"] else "FAIL"
            detail = r.get("skipped") or f"{r['value']} (limit {r.get('limit')})"
            print(f"{verdict} {r['check']}: {detail}", flush=True)
        if args.json:
            write_json_atomic(args.json, out)
        return EXIT_OK if all(r["ok"] is not False for r in out) else EXIT_FAILED_CHECK
    return run_command("benchmarks.gpu_checks", body)


if __name__ == "__main__":
    raise SystemExit(main())
