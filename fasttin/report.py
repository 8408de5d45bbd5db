"""What a run shows and leaves behind: the rich live view, metrics.jsonl, curves.png, tables."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from fasttin.fileio import tmp_name, write_atomic

console = Console(stderr=True, width=None if sys.stderr.isatty() else 120)  # logs: no wrapping at 80


class LiveView:
    """A progress bar per epoch with img/s, loss and ETA; silent on ranks other than 0, and in logs
    (not a terminal), where a bar's final frame would land after the run's last message."""

    def __init__(self, enabled: bool = True):
        self.progress = Progress(TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[rate]:>8} img/s  loss {task.fields[loss]}  "
                                            "data wait {task.fields[wait]}"),
                                 TimeRemainingColumn(), console=console, disable=not enabled or not console.is_terminal)

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def start_epoch(self, epoch: int, total: int, done: int = 0):
        self.task = self.progress.add_task("train", total=total, completed=done, epoch=epoch, rate="", loss="",
                                          wait="")

    def update(self, steps: int, loss: float, img_s: float, wait_share: float = 0.0):
        self.progress.update(self.task, completed=steps, loss=f"{loss:.3f}", rate=f"{img_s:,.0f}",
                             wait=f"{wait_share:.0%}")

    def end_epoch(self, row: dict):
        self.progress.update(self.task, completed=self.progress.tasks[-1].total)
        self.progress.console.print(
            f"epoch {row['epoch']}: train loss {row['train_loss']:.3f} acc {row['train_acc']:.1%} | val loss "
            f"{row['val_loss']:.3f} top-1 {row['val_acc1']:.1%} top-5 {row['val_acc5']:.1%}\n  "
            f"{row['epoch_s']:.1f} s, {row['train_img_s']:,.0f} img/s | {time_split(row)}")


def time_split(row: dict) -> str:
    """Where an epoch's (or a run's) time went, as shares: data wait, compute, eval, checkpoint."""
    return ", ".join(f"{label} {row.get(key + '_share', 0.0):.0%}" for key, label in (
        ("data_wait", "wait"), ("compute", "compute"), ("eval", "eval"), ("checkpoint", "ckpt")))


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_metrics(path: Path, rows: list[dict]) -> None:
    """The whole file, rewritten atomically: one JSON line per finished epoch."""
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows).encode())


def plot_curves(rows: list[dict], path: Path, title: str) -> None:
    """Loss and accuracy by epoch, train against val, like the write-up's figures."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(ep, [r["train_loss"] for r in rows], "o-", label="train")
    a.plot(ep, [r["val_loss"] for r in rows], "o-", label="val")
    a.set(xlabel="epoch", ylabel="loss", title="loss")
    b.plot(ep, [r["train_acc"] for r in rows], "o-", label="train top-1")
    b.plot(ep, [r["val_acc1"] for r in rows], "o-", label="val top-1")
    b.plot(ep, [r["val_acc5"] for r in rows], "--", label="val top-5")
    b.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1))
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    tmp = tmp_name(path).with_name(tmp_name(path).name + ".png")  # matplotlib picks the format by suffix
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def closing_table(rows: list[dict], title: str) -> Table:
    t = Table(title=title)
    for col in ("epoch", "lr", "train loss", "train acc", "val loss", "val top-1", "val top-5", "s", "img/s",
                "data wait", "compute", "eval", "ckpt"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(str(r["epoch"]), f"{r['lr']:.2e}", f"{r['train_loss']:.3f}", f"{r['train_acc']:.1%}",
                  f"{r['val_loss']:.3f}", f"{r['val_acc1']:.1%}", f"{r['val_acc5']:.1%}", f"{r['epoch_s']:.1f}",
                  f"{r['train_img_s']:,.0f}", *(f"{r.get(k + '_share', 0.0):.0%}" for k in
                                                ("data_wait", "compute", "eval", "checkpoint")))
    return t
