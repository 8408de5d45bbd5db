"""Val top-1 against wall-clock minutes for run folders (their metrics.jsonl), one line each, with
the write-up's figure as a level; and the markdown table of every run's epochs.

Usage: python tools/time_to_accuracy.py --out FIG.png [--writeup 0.259] [--table] [--compare] RUN_DIR ...
--compare prints one row a run: the settings where it differs from the first run, its final and best
top-1 (raw and EMA) and its minutes, the ablation table's rows.
The minutes are each run's own epochs (training, validation and checkpoints) added up, as
metrics.jsonl records them; set-up (decoding the split, building the model) is not counted.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from fasttin.errors import CommandParser, UserError, run_command
from fasttin.fileio import write_with


def load(run: Path) -> tuple[dict, list[dict]]:
    try:
        cfg = json.loads((run / "config.json").read_text())
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    except (OSError, ValueError) as e:
        raise UserError(f"{run}: not a finished fasttin run folder ({e})") from None
    if not rows:
        raise UserError(f"{run}: metrics.jsonl has no epoch yet")
    return cfg, rows


# the settings an ablation varies (the rest, paths and the environment, differ by run and say nothing)
COMPARED = ("epochs", "res", "res_schedule", "augment", "lr", "nesterov", "label_smoothing", "schedule",
            "warmup_epochs", "ema", "batch_size", "weight_decay")


def compare(runs: list[tuple[Path, dict, list[dict]]]) -> str:
    base = runs[0][1]
    lines = ["| run | differs from the first | final top-1 | best top-1 | best EMA top-1 | minutes |",
             "|---|---|---|---|---|---|"]
    for path, cfg, rows in runs:
        diff = ", ".join(f"{k} {'none' if cfg.get(k) == '' else cfg.get(k)}" for k in COMPARED
                         if cfg.get(k) != base.get(k)) or "-"
        ema = max((r["ema_val_acc1"] for r in rows if "ema_val_acc1" in r), default=None)
        lines.append(f"| {path.name} | {diff} | {rows[-1]['val_acc1']:.1%} | {max(r['val_acc1'] for r in rows):.1%} | "
                     f"{'-' if ema is None else f'{ema:.1%}'} | {minutes(rows)[-1]:.1f} |")
    return "\n".join(lines) + "\n"


def minutes(rows: list[dict]) -> list[float]:
    total, out = 0.0, []
    for r in rows:
        total += r["epoch_s"]
        out.append(total / 60)
    return out


def best_acc(r: dict) -> float:
    return max(r["val_acc1"], r.get("ema_val_acc1", 0.0))


def plot(runs: list[tuple[str, list[dict]]], path: Path, writeup: float | None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, rows in runs:
        ax.plot(minutes(rows), [best_acc(r) for r in rows], "o-", label=label, markersize=3)
    if writeup:
        ax.axhline(writeup, color="grey", ls="--", lw=1, label=f"write-up's seed-64-scratch ({writeup:.1%})")
    ax.set(xlabel="wall-clock minutes (training, validation, checkpoints)",
           ylabel="val top-1 (the better of raw and EMA weights)",
           title="ResNet18, standard stem, 200 classes, from scratch, CPU")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        write_with(path, lambda tmp: fig.savefig(tmp, dpi=110))
    finally:
        plt.close(fig)


def table(label: str, rows: list[dict]) -> str:
    lines = [f"{label}:", "", "| epoch | res | lr (first step) | val top-1 | EMA top-1 | val top-5 | minutes | img/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r, m in zip(rows, minutes(rows)):
        ema = f"{r['ema_val_acc1']:.1%}" if "ema_val_acc1" in r else ""
        lines.append(f"| {r['epoch']} | {r.get('res', '')} | {r['lr']:.3g} | {r['val_acc1']:.1%} | {ema} | "
                     f"{r['val_acc5']:.1%} | {m:.1f} | {r['train_img_s']:,.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = CommandParser("tools.time_to_accuracy", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--writeup", type=float, default=0.259)
    p.add_argument("--table", action="store_true", help="also print each run's epochs as a markdown table")
    p.add_argument("--compare", action="store_true", help="also print one row a run against the first")
    a = p.parse_args(argv)

    def body() -> int:
        loaded = [(r, *load(r)) for r in a.runs]
        recipes = [cfg["recipe"] for _, cfg, _ in loaded]  # a run's label: its recipe, or its folder when shared
        runs = [(cfg["recipe"] if recipes.count(cfg["recipe"]) == 1 else r.name, rows) for r, cfg, rows in loaded]
        plot(runs, a.out, a.writeup)
        if a.compare:
            print(compare(loaded))
        for label, rows in runs:
            reached = next((m for r, m in zip(rows, minutes(rows)) if best_acc(r) > a.writeup), None)
            print(f"{label}: best {max(best_acc(r) for r in rows):.1%} in {minutes(rows)[-1]:.1f} min; past "
                  f"{a.writeup:.1%} at " + (f"{reached:.1f} min" if reached is not None else "never"))
            if a.table:
                print(table(label, rows))
        return 0
    return run_command("tools.time_to_accuracy", body)


if __name__ == "__main__":
    sys.exit(main())
