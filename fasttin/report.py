"""What a run shows and leaves behind: log lines, the rich live view, the rate and ETA line, each
epoch's metrics row (metrics.jsonl), the summary and verdict (summary.json), curves.png, tables."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from fasttin import tuning
from fasttin.errors import UserError
from fasttin.fileio import os_reason, write_atomic, write_json_atomic, write_with
from fasttin.loop import Budget, shares, verdict
from fasttin.recipes import WRITEUP_TOP1


class LogStream:
    """stderr for the log (whatever sys.stderr is at the time), gone quiet once its reader is gone
    (`| head`, a closed terminal): the run goes on and loses nothing, where a BrokenPipeError would
    have ended it with no checkpoint."""

    @property
    def stream(self):
        return sys.stderr

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            self._silence()
            return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except BrokenPipeError:
            self._silence()

    def _silence(self) -> None:
        """The descriptor onto /dev/null, so the interpreter's own last flush at exit fails neither."""
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self.stream.fileno())
        os.close(devnull)

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()


console = Console(file=LogStream(), width=None if sys.stderr.isatty() else 120)  # logs: no wrapping at 80


def log(message: str) -> None:
    """One log line: never wrapped (a message stays one line whatever its path's length) and never
    read as rich markup (a path may hold brackets)."""
    console.print(message, soft_wrap=True, markup=False, highlight=False)


def duration(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"


def epoch_row(epoch: int, train: dict, val: dict, times: dict, *, lr: float, res: int, val_res: int, steps: int,
              batches: int, batch_size: int, compile_s: float | None = None) -> dict:
    """One line of metrics.jsonl (the checkpoint and total times are added once known). train_img_s
    is over this invocation's steps of the epoch, the compiling first step left out."""
    seconds, n = times["data_wait_s"] + times["compute_s"], steps
    if compile_s is not None and steps > 1:
        seconds, n = seconds - compile_s, steps - 1
    row = {"epoch": epoch + 1, "lr": lr, "res": res, "val_res": val_res, "batches": batches,
           "train_loss": train["loss"], "train_acc": train["acc1"], "val_loss": val["loss"], "val_acc1": val["acc1"],
           "val_acc5": val["acc5"]}
    if "ema_acc1" in val:
        row.update(ema_val_loss=val["ema_loss"], ema_val_acc1=val["ema_acc1"], ema_val_acc5=val["ema_acc5"])
    return {**row, "train_img_s": n * batch_size / max(seconds, 1e-9), **times}


def time_row(row: dict, rows: list[dict], t0: float, validated: float) -> None:
    """An epoch's row gets its times, from one clock reading: the epoch's since `t0`, the checks,
    metrics and checkpoint since the end of validation (`validated`), the shares, the run's so far
    (`rows`, this one included)."""
    now = time.perf_counter()
    row.update(checkpoint_s=now - validated, epoch_s=now - t0)
    row.update(shares(row, row["epoch_s"]), elapsed_s=sum(r["epoch_s"] for r in rows))


def summary(rows: list[dict], cfg: dict, *, best: float, best_weights: str, compile_s, backend: str,
            better_backend, device, world: int, steps_per_epoch: int, budget_spent_s) -> dict:
    """summary.json: the run's accuracy beside the write-up's, its time and where it went, and the verdict line."""
    total = sum(r["epoch_s"] for r in rows)
    times = {k: sum(r.get(k, 0.0) for r in rows) for k in ("data_wait_s", "compute_s", "eval_s", "checkpoint_s")}
    run_shares = {k[:-6]: v for k, v in shares(times, total).items()}
    run_shares["compile"] = (compile_s or 0.0) / max(total, 1e-9)
    line = verdict(run_shares, backend=backend, better_backend=better_backend, tta=cfg["tta"],
                   faster=tuning.faster(cfg, device))
    last = rows[-1] if rows else {}
    return {"recipe": cfg["recipe"], "epochs": len(rows),
            "epochs_fitted": sum(r.get("batches", steps_per_epoch) for r in rows) / steps_per_epoch,
            "best_val_acc1": best, "best_weights": best_weights, "final_val_acc1": last.get("val_acc1"),
            "final_val_acc5": last.get("val_acc5"), "final_ema_val_acc1": last.get("ema_val_acc1"),
            "train_s": total, "budget_min": cfg["budget"] or None, "budget_spent_s": budget_spent_s,
            "compile_s": compile_s, **times, **shares(times, total), "verdict": line, "pretrained": cfg["pretrained"],
            "pretrained_reason": cfg.get("pretrained_reason"), "writeup_val_acc1": WRITEUP_TOP1.get(cfg["recipe"]),
            "device": str(device), "world_size": world}


def finish_run(out: Path | None, rows: list[dict], cfg: dict, *, budget: Budget | None, **facts) -> dict:
    """The run's summary (`facts`: summary's), returned on every rank; rank 0 (`out` given) writes it
    with curves.png, shows the closing table and the verdict, and says if the run overran its `budget`."""
    s = summary(rows, cfg, budget_spent_s=budget.local_spent() if budget else None, **facts)
    if out is not None and rows:
        write_run(out, rows, s, f"fasttin {cfg['recipe']}, {facts['device'].type}")
    note = budget and budget.overrun_note(s["budget_spent_s"])
    if note and out is not None:
        log(note)
    return s


def write_run(out: Path, rows: list[dict], summary: dict, title: str) -> None:
    """summary.json and curves.png into the run folder, then the closing table and the verdict."""
    write_json_atomic(out / "summary.json", summary)
    plot_curves(rows, out / "curves.png", title)
    console.print(closing_table(rows, f"{summary['recipe']} -> {out}"))
    log(f"verdict: {summary['verdict']}")


class LiveView:
    """What a run shows while it trains: a progress bar per epoch with img/s, loss and ETA (on a
    terminal, rank 0), RUN_DIR/progress.json at each logging step, and once, at the second logging
    step, the rate measured since the first and what it means for the epoch and the run (or, under
    --budget, how many epochs the budget holds). Silent on ranks other than 0; no bar in logs (not a terminal),
    where its final frame would land after the run's last message."""

    def __init__(self, enabled: bool, out: Path, steps_per_epoch: int, batch_size: int, epochs: int,
                 budget_min: float, log, spent_before_s: float = 0.0):
        self.enabled, self.out, self.steps_per_epoch, self.batch_size = enabled, out, steps_per_epoch, batch_size
        self.epochs, self.budget_min, self.log, self.rate_said = epochs, budget_min, log, False
        self.spent_before_s = spent_before_s  # of the budget, by the run's earlier processes
        self.warmup = None  # (epoch, steps, seconds) of the first logging window
        self.progress = Progress(TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[rate]:>8} img/s  loss {task.fields[loss]}  "
                                            "data wait {task.fields[wait]}"),
                                 TimeRemainingColumn(), console=console, disable=not enabled or not console.is_terminal)

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def start_epoch(self, epoch: int, first: int = 0, carried: dict | None = None):
        """0-based `epoch`, resumed at batch `first` with the clock's totals `carried` from before."""
        self.carried = dict(carried or {"data_wait_s": 0.0, "compute_s": 0.0})  # the rate leaves them out
        self.task = self.progress.add_task("train", total=self.steps_per_epoch, completed=first, epoch=epoch + 1,
                                          rate="", loss="", wait="")

    def step(self, epoch: int, first: int, steps: int, loss: float, totals: dict) -> None:
        """A logging step: `steps` done since batch `first` of 0-based `epoch`; `totals` the clock's."""
        totals = {k: v - self.carried.get(k, 0.0) for k, v in totals.items()}
        busy = totals["data_wait_s"] + totals["compute_s"]
        img_s = steps * self.batch_size / max(busy, 1e-9)
        self.progress.update(self.task, completed=first + steps, loss=f"{loss:.3f}", rate=f"{img_s:,.0f}",
                             wait=f"{totals['data_wait_s'] / max(busy, 1e-9):.0%}")
        if not self.enabled:
            return
        write_progress(self.out, epoch + 1, first + steps, self.steps_per_epoch)
        self.say_rate(epoch, steps, busy)

    def say_rate(self, epoch: int, steps: int, busy: float) -> None:
        """Once, the rate and what it means, measured after the run's first logging window: that window
        holds the warm-up (CUDA's start, cuDNN's autotuning, compiling), which on a GPU can take
        longer than the rest of the epoch."""
        if self.rate_said:
            return
        if self.warmup is None:
            self.warmup = (epoch, steps, busy)
            return
        warm_epoch, warm_steps, warm_s = self.warmup
        if warm_epoch == epoch:  # the clock's totals run from the epoch's start
            steps, busy = steps - warm_steps, busy - warm_s
        if steps < 1:
            return
        self.rate_said = True
        img_s = steps * self.batch_size / max(busy, 1e-9)
        per_epoch = self.steps_per_epoch * self.batch_size / max(img_s, 1e-9)
        if self.budget_min:
            left = self.budget_min * 60 - self.spent_before_s
            tail = f"the {self.budget_min:g}-minute budget holds about {left / per_epoch:.1f} epoch(s)" + (
                f" more ({self.spent_before_s:.0f} s of it spent before this resume)" if self.spent_before_s else "")
        else:
            tail = f"{duration(per_epoch * (self.epochs - epoch))} for the {self.epochs - epoch} epoch(s) left"
        self.log(f"measured {img_s:,.0f} img/s after the first {warm_steps} step(s) (they took {warm_s:.1f} s, "
                 f"warm-up included): about {duration(per_epoch)} of training an epoch, {tail} (validation extra)")

    def end_epoch(self, row: dict):
        self.progress.update(self.task, completed=self.steps_per_epoch)
        ema = f" (EMA {row['ema_val_acc1']:.1%})" if "ema_val_acc1" in row else ""
        self.progress.console.print(
            f"epoch {row['epoch']}: train loss {row['train_loss']:.3f} acc {row['train_acc']:.1%} | val loss "
            f"{row['val_loss']:.3f} top-1 {row['val_acc1']:.1%}{ema} top-5 {row['val_acc5']:.1%} at res "
            f"{row['val_res']}\n  {row['epoch_s']:.1f} s, {row['train_img_s']:,.0f} img/s at res {row['res']} | "
            f"{time_split(row)}")


def time_split(row: dict) -> str:
    """Where an epoch's (or a run's) time went, as shares: data wait, compute, eval, checkpoint."""
    return ", ".join(f"{label} {row.get(key + '_share', 0.0):.0%}" for key, label in (
        ("data_wait", "wait"), ("compute", "compute"), ("eval", "eval"), ("checkpoint", "ckpt")))


def write_progress(out: Path, epoch: int, step: int, steps_per_epoch: int) -> None:
    """RUN_DIR/progress.json at each logging step: where the run is and rank 0's pid, for tools and
    tests that wait for an event. Replaced by rename, without fsync: it is a hint, not a record."""
    write_atomic(out / "progress.json", json.dumps({"epoch": epoch, "step": step, "steps_per_epoch": steps_per_epoch,
                                                    "pid": os.getpid(), "time": time.time()}).encode(), sync=False)


METRICS_FIX = "restore it, or start the run again with --overwrite"  # a damaged or lost metrics.jsonl


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl's rows ([] when there is none); a damaged line is one line naming the file and the line."""
    if not path.exists():
        return []
    if not path.is_file():
        raise UserError(f"{path} is not a file (a folder?), so the run's metrics cannot be read; {METRICS_FIX}")
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is damaged (not UTF-8: {e}); {METRICS_FIX}") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {os_reason(e)}") from None
    rows = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError as e:
                raise UserError(f"{path} line {n} is damaged ({e}); {METRICS_FIX}") from None
            if not isinstance(rows[-1], dict) or not isinstance(rows[-1].get("epoch"), int):
                raise UserError(f"{path} line {n} is not a metrics row (no epoch); {METRICS_FIX}")
    return rows


def metrics_upto(path: Path, rows_seen: int | None, epochs: int, *, rewrite: bool) -> list[dict]:
    """A resumed run's rows: those its checkpoint had seen (by count; by epoch for an earlier
    fasttin's), the file cut back to them when `rewrite` (so no epoch is repeated or skipped).
    Fewer rows than the checkpoint saw is a lost file: refused, or the summary would leave epochs out."""
    rows = read_metrics(path)
    if rows_seen is not None and len(rows) < rows_seen:
        raise UserError(f"{path} holds {len(rows)} row(s) but the checkpoint has seen {rows_seen}: the run's metrics "
                        f"were lost; {METRICS_FIX}")
    kept = rows[:rows_seen] if rows_seen is not None else [r for r in rows if r["epoch"] <= epochs]
    if rewrite and kept != rows:
        write_metrics(path, kept)
    return kept


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
    if all("ema_val_acc1" in r for r in rows):
        b.plot(ep, [r["ema_val_acc1"] for r in rows], "o:", label="val top-1, EMA weights")
    b.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1))
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    try:
        write_with(path, lambda tmp: fig.savefig(tmp, dpi=100))  # the temporary keeps .png: matplotlib's format
    finally:
        plt.close(fig)


def closing_table(rows: list[dict], title: str) -> Table:
    t = Table(title=title)
    ema = all("ema_val_acc1" in r for r in rows)
    for col in ("epoch", "res", "lr", "train loss", "train acc", "val loss", "val top-1", "val top-5",
                *(("EMA top-1",) if ema else ()), "s", "img/s", "data wait", "compute", "eval", "ckpt"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(str(r["epoch"]), str(r.get("res", "")), f"{r['lr']:.2e}", f"{r['train_loss']:.3f}",
                  f"{r['train_acc']:.1%}", f"{r['val_loss']:.3f}", f"{r['val_acc1']:.1%}", f"{r['val_acc5']:.1%}",
                  *((f"{r['ema_val_acc1']:.1%}",) if ema else ()), f"{r['epoch_s']:.1f}",
                  f"{r['train_img_s']:,.0f}", *(f"{r.get(k + '_share', 0.0):.0%}" for k in
                                                ("data_wait", "compute", "eval", "checkpoint")))
    return t
