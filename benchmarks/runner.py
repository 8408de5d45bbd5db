"""The one runner of the benchmark table: needs, warm-up, timed rounds in turn, records.

Every grid point of a `Stage` row becomes one record; a missing need or a `Skip` raised by the row
becomes a record with `skipped` and the reason, so nothing goes silently missing, and a pass that
yields no images is skipped, never recorded as 0 img/s.
"""
from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fasttin.loaders import dali as dali_backend


class Skip(Exception):
    """Raised by a stage that cannot measure this point; the message is the record's reason."""


# need -> why it is missing on this bench (None: present)
NEEDS: dict[str, Callable[[Bench], str | None]] = {
    "cuda": lambda b: None if b.device.type == "cuda" else "no CUDA device",
    "dali": lambda b: dali_backend.available(),
    "jpeg": lambda b: None if b.ds.payload == "jpeg" else "raw payload: nothing to decode",
}

# the grid keys that are record fields too
RECORD_KEYS = ("backend", "res", "device", "dtype", "batch_size", "augment", "clock", "kernel", "workers", "side")


@dataclass(frozen=True)
class Stage:
    """One row of the benchmark table. run(bench, **point) returns a consumer (one pass -> images),
    or (consumer, extra record fields[, after]), after() giving more fields once the rounds are
    timed (the peers' MAE); an extra `bytes_per_image` makes the record's mb_per_s. The rows of an
    `alternate` group are timed in turn at each resolution; `grid(bench, res)` lists the points
    (res None where `per_res=False`); `name` formats a point, or is a function of it."""

    stage: str
    name: str | Callable[[dict], str]
    run: Callable
    needs: tuple[str, ...] = ()
    grid: Callable[[Bench, int | None], list[dict]] | None = None
    per_res: bool = True
    alternate: str | None = None  # the group whose rows are timed in turn (e.g. the loaders)
    fields: dict = field(default_factory=dict)  # fixed record fields: backend, device, dtype...

    def points(self, b: Bench, res: int | None) -> list[dict]:
        return self.grid(b, res) if self.grid else [{"res": res} if self.per_res else {}]

    def label(self, point: dict) -> str:
        return self.name(point) if callable(self.name) else self.name.format(**point)


class Bench:
    """The shared settings, the data set, the records so far (each carries the machine and date:
    a record copied alone keeps its evidence), and a cache of built objects (the loaders, the
    peers' worker processes) that the stages of one resolution share."""

    def __init__(self, args, device: torch.device, ds, records: list | None = None, environment: dict | None = None):
        self.args, self.device, self.ds = args, device, ds
        self.records: list[dict] = [] if records is None else records
        self.environment = environment
        self.cache: dict = {}
        self.closers: list = []

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def missing(self, needs) -> str | None:
        return next((why for why in (NEEDS[n](self) for n in needs) if why), None)

    def shared(self, key, build):
        """build() once per key until `release()`; a Skip raised while building is kept and re-raised."""
        if key not in self.cache:
            try:
                self.cache[key] = build()
            except Skip as e:
                self.cache[key] = e
        if isinstance(self.cache[key], Skip):
            raise self.cache[key]
        return self.cache[key]

    def on_release(self, close) -> None:
        """close() at `release()`: what a row started (a worker process) ends with its resolution."""
        self.closers.append(close)

    def release(self) -> None:
        self.cache.clear()
        while self.closers:
            self.closers.pop()()

    def timed(self, fn) -> tuple[int, float]:
        """fn() -> images, timed here; or -> (images, seconds) from a consumer that times itself
        (a process of its own, whose start-up is not the figure)."""
        t = time.perf_counter()
        n = fn()
        self.sync()
        n, dt = n if isinstance(n, tuple) else (n, time.perf_counter() - t)
        if not n:
            raise Skip("a repeat yielded no images (the pass ended at once)")
        return n, dt

    def add(self, stage: str, name: str, *, skipped: str | None = None, **fields) -> dict:
        """One record in the schema of every benchmark record (stage, name, backend, res, batch_size,
        device, dtype, img_per_s, mb_per_s, repeats) plus the row's fields; a skipped one carries
        the reason and no figure."""
        rec = {"stage": stage, "name": name, "backend": None, "res": None, "batch_size": self.args.batch_size,
               "device": self.device.type, "dtype": None, "img_per_s": None, "mb_per_s": None, "repeats": 0}
        rec.update({k: v for k, v in fields.items() if v is not None or k not in rec})
        if rec["img_per_s"] and rec.get("bytes_per_image"):
            rec["mb_per_s"] = rec["img_per_s"] * rec["bytes_per_image"] / 1e6
        if skipped:
            rec.update(skipped=skipped, img_per_s=None, mb_per_s=None, repeats=0)
        if self.environment:
            rec["environment"] = self.environment
        self.records.append(rec)
        shown = f"skipped: {skipped}" if skipped else f"{rec['img_per_s']:,.0f} img/s"
        print(f"  {stage:8s} {name:42s} res {str(rec['res'] or '-'):>4s}  {shown}", file=sys.stderr, flush=True)
        return rec


def rate(records: list[dict], **match) -> float | None:
    """The img/s of the first measured record whose fields match (None: there is none)."""
    found = (r for r in records if r.get("img_per_s") and all(r.get(k) == v for k, v in match.items()))
    return next((r["img_per_s"] for r in found), None)


def envelope(command: str, argv, **fields) -> dict:
    """The one record every benchmark writes: when and on what it ran (fasttin.info), the command
    that made it, as typed, and its figures."""
    from fasttin.info import dated_environment
    args = sys.argv[1:] if argv is None else argv
    return {"environment": dated_environment(), "command": " ".join([f"python -m {command}", *map(str, args)]),
            **fields}


def rotation(keys: list, round_: int) -> list:
    """The order of round `round_` of an alternation: each key goes first in turn (two keys: AB, BA,
    AB...), so that neither drift nor a warmer cache favours one side. The one alternation order
    of every benchmark here."""
    k = round_ % len(keys) if keys else 0
    return keys[k:] + keys[:k]


def run_group(b: Bench, rows: list[tuple[Stage, dict]]) -> None:
    """Rows timed together (the loaders and the pipelines they are compared with, the model's
    configurations, the peers), or one row's point alone: a warm-up pass each (a whole pass, so
    workers are started and caches filled), then `repeats` rounds of one timed pass each, each row
    going first in turn (`rotation`), so that they share the machine's state and none always runs
    first. A row's `after` runs once all are timed."""
    why, built, rates = {}, {}, {}
    for i, (stage, point) in enumerate(rows):
        why[i] = b.missing(stage.needs)
        if why[i] is None:
            try:
                got = stage.run(b, **point)
                consumer, extra, *after = got if isinstance(got, tuple) else (got, {})
                built[i], rates[i] = (consumer, extra, after[0] if after else dict), []
            except Skip as e:
                why[i] = str(e)
    for r in range(-1, b.args.repeats):  # round -1: the warm-up
        for i in rotation(list(built), max(r, 0)):
            if not why[i]:
                try:
                    n, dt = b.timed(built[i][0])
                except Skip as e:
                    why[i] = str(e)
                    continue
                rates[i] += [n / dt] if r >= 0 else []
    for i, (stage, point) in enumerate(rows):
        fields = {}
        if not why[i]:
            _, extra, after = built[i]
            try:
                fields = {**extra, "img_per_s": statistics.median(rates[i]), "repeats": len(rates[i]),
                          "runs": rates[i], **after()}
            except Skip as e:
                why[i] = str(e)
        fields.update(stage.fields, **{k: point[k] for k in RECORD_KEYS if k in point})
        b.add(stage.stage, stage.label(point), skipped=why[i], **fields)


def run_table(b: Bench, table: list[Stage], selected: set[str], resolutions: list[int]) -> list[dict]:
    """Every selected row at every grid point: the rows without a resolution first, then per
    resolution in table order, each alternating group measured where the first of its rows
    stands. Built objects (loaders) are released after each resolution, and what the rows started
    (the peers' processes) is ended, whatever stops the run."""
    rows = [s for s in table if s.stage in selected]
    for res in [None, *resolutions]:
        groups: dict = {}
        for s in (s for s in rows if s.per_res == (res is not None)):
            for i, point in enumerate(s.points(b, res)):
                groups.setdefault(s.alternate or (id(s), i), []).append((s, point))
        try:
            for group in groups.values():
                run_group(b, group)
        finally:  # an interrupted run too: no worker process outlives it
            b.release()
    return b.records
