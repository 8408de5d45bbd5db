"""python -m benchmarks.agreement: does the benchmark's train stage measure what fasttin.train does?

Alternates, round by round in one session, a real `fasttin.train` run and `benchmarks.run`'s train
stage on the same data and settings (recipe, res, batch, backend, device), each in its own process
as a user runs them, and prints the ratio of their medians. The trainer's figure is its last
epoch's `train_img_s` (the first epoch carries the warm-up); the stage's is its median repeat of
one epoch's steps. The target is agreement within 5% (issue 11). Alternating matters: this
machine's speed drifts by tens of percent within minutes, so only pairs measured side by side count.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.runner import envelope, rotation
from fasttin.errors import CommandParser, UserError, run_command
from fasttin.fileio import ensure_writable, write_json_atomic
from fasttin.recipes import count
from fasttin.shards import FormatError, open_split


def run(module: str, *args: str) -> None:
    """`python -m module args` as a user runs it; a failure is one line with its last words."""
    r = subprocess.run([sys.executable, "-m", module, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       text=True)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise UserError(f"python -m {module} exited with status {r.returncode}: {last}")


def trainer_rate(common: list[str], folder: Path, epochs: int) -> float:
    out = folder / "run"
    run("fasttin.train", *common, "--epochs", str(epochs), "--out", str(out), "--overwrite")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return rows[-1]["train_img_s"]


def stage_rate(common: list[str], folder: Path, steps: int, repeats: int) -> float:
    out = folder / "stage.json"
    run("benchmarks.run", *common, "--stages", "train", "--steps", str(steps), "--repeats", str(repeats),
        "--json", str(out))
    (rec,) = [r for r in json.loads(out.read_text())["records"] if r["stage"] == "train" and not r.get("skipped")]
    return rec["img_per_s"]


def main(argv=None) -> int:
    p = CommandParser("benchmarks.agreement", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--recipe", default="seed-64-scratch")
    p.add_argument("--res", type=count("res"), default=64)
    p.add_argument("--batch-size", type=count("batch_size"), default=100)
    p.add_argument("--backend", default="resident")
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=count("rounds"), default=3, help="alternated trainer / stage pairs")
    p.add_argument("--epochs", type=count("epochs"), default=2, help="trainer epochs a round (the last one is timed)")
    p.add_argument("--repeats", type=count("repeats"), default=2, help="stage repeats of one epoch's steps a round")
    p.add_argument("--json", help="write the figures here")
    a = p.parse_args(argv)
    return run_command("benchmarks.agreement", lambda: measure(a, argv))


def measure(a, argv) -> int:
    if a.json:
        ensure_writable(Path(a.json))
    try:
        steps = len(open_split(a.data, "train")) // a.batch_size
    except (OSError, FormatError, ValueError) as e:
        raise UserError(f"--data {a.data}: {e}") from None
    if steps < 1:
        raise UserError(f"--batch-size {a.batch_size}: larger than the train split of {a.data}")
    common = ["--data", a.data, "--recipe", a.recipe, "--res", str(a.res), "--batch-size", str(a.batch_size),
              "--device", a.device]
    trainer, stage = [], []
    with tempfile.TemporaryDirectory(prefix="fasttin-agreement-") as tmp:
        for i in range(a.rounds):
            for side in rotation(["trainer", "stage"], i):
                if side == "trainer":
                    trainer.append(trainer_rate([*common, "--backend", a.backend], Path(tmp), a.epochs))
                else:
                    stage.append(stage_rate([*common, "--backends", a.backend], Path(tmp), steps, a.repeats))
                print(f"round {i + 1}/{a.rounds} {side}: {(trainer if side == 'trainer' else stage)[-1]:,.1f} img/s",
                      flush=True)
    t, s = statistics.median(trainer), statistics.median(stage)
    print(f"median: fasttin.train {t:,.1f} img/s, train stage {s:,.1f} img/s: stage / trainer = {s / t:.3f} "
          f"({s / t - 1:+.1%}; target within 5%)")
    if a.json:
        write_json_atomic(Path(a.json), envelope(
            "benchmarks.agreement", argv, settings={k: v for k, v in vars(a).items() if k != "json"},
            steps_per_epoch=steps, trainer_img_per_s=trainer, stage_img_per_s=stage, ratio=s / t))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
