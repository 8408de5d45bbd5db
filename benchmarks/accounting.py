"""python -m benchmarks.accounting: what the trainer's time accounting (loop.StepClock) costs.

Runs the real training step over the same in-memory batches with and without the clock,
alternating the two in one process (ABBA) so that drift and load hit both alike, and prints the
ratio of the medians and the median of each pair's ratio (the sturdier of the two on a machine
whose speed drifts). The target is at most 1% (issue 11).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.run import positive
from fasttin.errors import EXIT_BAD_INPUT, UserError
from fasttin.fileio import ensure_writable, write_json_atomic
from fasttin.info import dated_environment
from fasttin.loop import StepClock, make_step, train_epoch
from fasttin.model import build_model
from fasttin.recipes import resolve


def measure(*, res: int, batch: int, steps: int, repeats: int, device: str, log_every: int) -> dict:
    cfg = {**resolve("seed-64-scratch", res=res, batch_size=batch, lr=0.01), "amp": "off" if device == "cpu"
           else "bf16"}
    step = make_step(build_model(200, "imagenet"), cfg, device=device, steps_per_epoch=steps)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(batch, 3, res, res, generator=g).to(device, memory_format=torch.channels_last),
             torch.randint(0, 200, (batch,), generator=g).to(device)) for _ in range(steps)]
    train_epoch(step, data, log_every=log_every)  # warm-up
    times = {"without": [], "with": []}
    for i in range(repeats):  # ABBA order: neither side always runs first (or on a warmer cache)
        for kind in ("without", "with") if i % 2 == 0 else ("with", "without"):
            clock = StepClock(device) if kind == "with" else None
            t0 = time.perf_counter()
            train_epoch(step, data, clock=clock, log_every=log_every)
            times[kind].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    paired = statistics.median(w / wo for w, wo in zip(times["with"], times["without"])) - 1
    return {**med, "overhead": med["with"] / med["without"] - 1, "paired_overhead": paired, "runs": times}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.accounting", description=__doc__.split("\n\n")[0])
    p.add_argument("--res", type=positive, default=32)
    p.add_argument("--batch-size", type=positive, default=32)
    p.add_argument("--steps", type=positive, default=20, help="steps per measured pass")
    p.add_argument("--repeats", type=positive, default=5, help="alternated pairs of passes")
    p.add_argument("--log-every", type=positive, default=25)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path, help="write the figures here")
    a = p.parse_args(argv)
    if a.json:
        try:
            ensure_writable(a.json)
        except UserError as e:
            print(f"benchmarks.accounting: error: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT
    r = measure(res=a.res, batch=a.batch_size, steps=a.steps, repeats=a.repeats, device=a.device,
                log_every=a.log_every)
    print(f"{a.steps} steps, res {a.res}, batch {a.batch_size}, {a.device}, {a.repeats} alternated pairs: "
          f"median {r['without']:.3f} s without the clock, {r['with']:.3f} s with it: "
          f"overhead {r['overhead']:+.2%} (ratio {r['with'] / r['without']:.4f}); median of the pairs' "
          f"ratios: {r['paired_overhead']:+.2%}")
    if a.json:
        write_json_atomic(a.json, {"environment": dated_environment(),
                                   "command": " ".join(["python -m benchmarks.accounting",
                                                        *(argv if argv is not None else sys.argv[1:])]),
                                   "settings": {k: v for k, v in vars(a).items() if k != "json"}, **r})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
