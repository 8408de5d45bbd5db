"""python -m benchmarks.accounting: what the trainer's time accounting (loop.StepClock) costs.

Runs the real training step over the same in-memory batches with and without the clock,
alternating the two in one process (AB, BA, ...) so that drift and load hit both alike, and prints the
ratio of the medians and the median of each pair's ratio (the sturdier of the two on a machine
whose speed drifts). The target is at most 1% (issue 11).
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from benchmarks.runner import envelope, rotation
from fasttin.errors import CommandParser, run_command
from fasttin.fileio import ensure_writable, write_json_atomic
from fasttin.info import resolve_device
from fasttin.loop import StepClock, make_step, train_epoch
from fasttin.model import build_model
from fasttin.recipes import count, resolve


def measure(*, res: int, batch: int, steps: int, repeats: int, device: str, log_every: int) -> dict:
    cfg = {**resolve("seed-64-scratch", res=res, batch_size=batch, lr=0.01), "amp": "off" if device == "cpu"
           else "bf16"}
    step = make_step(build_model(200, "imagenet"), cfg, device=device, steps_per_epoch=steps)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(batch, 3, res, res, generator=g).to(device, memory_format=torch.channels_last),
             torch.randint(0, 200, (batch,), generator=g).to(device)) for _ in range(steps)]
    train_epoch(step, data, log_every=log_every)  # warm-up
    times = {"without": [], "with": []}
    for i in range(repeats):
        for kind in rotation(["without", "with"], i):
            clock = StepClock(device) if kind == "with" else None
            t0 = time.perf_counter()
            train_epoch(step, data, clock=clock, log_every=log_every)
            times[kind].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    paired = statistics.median(w / wo for w, wo in zip(times["with"], times["without"])) - 1
    return {**med, "overhead": med["with"] / med["without"] - 1, "paired_overhead": paired, "runs": times}


def main(argv=None) -> int:
    p = CommandParser("benchmarks.accounting", description=__doc__.split("\n\n")[0])
    p.add_argument("--res", type=count("res"), default=32)
    p.add_argument("--batch-size", type=count("batch_size"), default=32)
    p.add_argument("--steps", type=count("steps"), default=20, help="steps per measured pass")
    p.add_argument("--repeats", type=count("repeats"), default=5, help="alternated pairs of passes")
    p.add_argument("--log-every", type=count("log_every"), default=25)
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when there is one)")
    p.add_argument("--json", type=Path, help="write the figures here")
    a = p.parse_args(argv)

    def body() -> int:
        if a.json:
            ensure_writable(a.json)
        device = str(resolve_device(a.device))
        r = measure(res=a.res, batch=a.batch_size, steps=a.steps, repeats=a.repeats, device=device,
                    log_every=a.log_every)
        print(f"{a.steps} steps, res {a.res}, batch {a.batch_size}, {device}, {a.repeats} alternated pairs: "
              f"median {r['without']:.3f} s without the clock, {r['with']:.3f} s with it: "
              f"overhead {r['overhead']:+.2%} (ratio {r['with'] / r['without']:.4f}); median of the pairs' "
              f"ratios: {r['paired_overhead']:+.2%}")
        if a.json:
            write_json_atomic(a.json, envelope("benchmarks.accounting", argv,
                                               settings={k: v for k, v in vars(a).items() if k != "json"}, **r))
        return 0
    return run_command("benchmarks.accounting", body)


if __name__ == "__main__":
    raise SystemExit(main())
