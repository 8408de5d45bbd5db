"""The peers rows of the benchmark table: fasttin's loaders beside FFCV, DALI's own idiom,
torchvision and the classic pipeline, loader only, on the CPU (`--stages peers`), and the worker
process each peer runs in with --workers threads or workers, so no loader inherits another's state
or libraries (FFCV's folder is on the path of its own worker only).

The runner times the peers like any group: a warm-up epoch each, then --repeats rounds of one epoch
each in turn; after the rounds, each peer's MAE against PIL bicubic on the first --mae-images
images. A peer that is not installed, or whose worker fails or hangs, is a record with `skipped`.
The runner asks on a pipe; the worker answers each with one dict:
  at start   {"ready": {version, dtype}}, or {"skipped": why} when the peer is not installed
  epoch      one whole epoch (the runner times it): {"images", "shape", "dtype"}
  mae N      {"mae": error, "images": N} on the first N images (see benchmarks.peers.mae)
  quit       exit
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import multiprocessing as mp
import os
import sys
from pathlib import Path

import numpy as np
import torch

from benchmarks.peers import mae as mae_mod
from benchmarks.peers.loaders import PEERS, Spec, build, version
from benchmarks.pipelines import split_files
from benchmarks.runner import Bench, Skip, Stage
from fasttin.loaders.augment import SIZE

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SITE = Path(os.environ.get("FASTTIN_PEERS_SITE", ROOT / ".peers-site"))
CLASSIC_AT_64 = "at the native 64 px the classic pipeline is the torchvision one: nothing to upscale"


# ---- the worker's side -----------------------------------------------------------------------------

def why_unavailable(peer: str) -> str | None:
    """A reason to skip the peer, found before building it (None: try to build it)."""
    if peer in ("fasttin-dali", "dali-files"):
        from fasttin.loaders import dali
        return dali.available()
    if peer.startswith("ffcv-"):
        try:
            import ffcv  # noqa: F401
        except ImportError as e:
            return f"FFCV is not importable ({type(e).__name__}: {e}); install it with benchmarks/peers/setup-ffcv.sh"
    return None


def one_epoch(epoch, spec: Spec) -> dict:
    """One whole epoch, each batch brought to a half-precision NCHW view as a trainer would take it."""
    dtype = getattr(torch, spec.dtype)
    n, shape, out = 0, None, None
    for x in epoch():
        if x.dtype not in (torch.float16, torch.bfloat16):
            x = x.to(dtype)  # the float32 loaders (torchvision, classic): to the run's half type
        n += x.shape[0]
        shape, out = shape or list(x.shape), out or str(x.dtype).removeprefix("torch.")
    if shape is not None and shape[1:] != [3, spec.res, spec.res]:
        raise RuntimeError(f"{spec.peer} gave batches of shape {shape}, expected [B, 3, {spec.res}, {spec.res}]")
    return {"images": n, "shape": shape, "dtype": out}


def measure_mae(spec: Spec, n: int) -> dict:
    """The peer's error against PIL bicubic on the first n images (unflipped, in pack order)."""
    from fasttin.shards import open_split
    ds = open_split(spec.data, spec.split)
    n = min(n, len(ds))
    epoch = build(dataclasses.replace(spec, flip=False, shuffle=False, dtype="float32", limit=n))
    batches = itertools.islice(epoch(), -(-n // spec.batch_size))  # fasttin's loaders read on past n
    pixels = np.concatenate([mae_mod.to_pixels(x) for x in batches])[:n]
    return {"mae": mae_mod.mean_abs_error(pixels, mae_mod.reference(ds, n, spec.res)), "images": n}


def stop_children() -> None:
    """End this process's DataLoader workers now: torch's own shutdown waits 5 s for each idle
    persistent worker (see fasttin.loaders.pil)."""
    for child in mp.active_children():
        child.terminate()
        child.join()


def serve(spec: Spec, site: str, conn) -> None:
    """The worker's body: FFCV's folder on the path of its own workers only, the libraries' prints
    on stderr, --workers threads."""
    if spec.peer.startswith("ffcv-"):
        sys.path.insert(0, site)
    os.dup2(2, 1)
    torch.set_num_threads(spec.workers)
    why = why_unavailable(spec.peer)
    if why:
        conn.send({"skipped": why})
        return
    epoch = build(spec)
    half = spec.dtype if PEERS[spec.peer].half == "any" else PEERS[spec.peer].half
    conn.send({"ready": {"version": version(spec.peer), "dtype": half}})
    answer = {"epoch": lambda: one_epoch(epoch, spec), "mae": lambda n: measure_mae(spec, n)}
    while True:
        try:
            cmd, *args = conn.recv()
        except EOFError:  # the runner is gone: end as at quit
            cmd = "quit"
        if cmd == "quit":
            return stop_children()
        conn.send(answer[cmd](*args))


# ---- the runner's side -----------------------------------------------------------------------------

class WorkerFailed(Skip):
    """A worker that died or hung: its peer becomes a skipped record."""


class Worker:
    """One peer's loader in a spawned process (it inherits none of this one's state or threads);
    each question waits for its answer on a pipe, up to a deadline."""

    def __init__(self, spec: Spec, site: Path, timeout_s: float):
        ctx = mp.get_context("spawn")
        self.conn, theirs = ctx.Pipe()
        self.timeout_s = timeout_s
        self.proc = ctx.Process(target=serve, args=(spec, str(site), theirs), name=f"peer {spec.peer}")
        self.proc.start()
        theirs.close()  # the worker's end lives in the worker only: its exit is this end's EOF

    def ask(self, *command) -> dict:
        """Send `command` (none: just read the greeting) and return the answer."""
        try:
            if command:
                self.conn.send(command)
            if self.conn.poll(self.timeout_s):
                return self.conn.recv()
        except (EOFError, OSError):
            self.proc.join()
            raise WorkerFailed(f"worker exited with status {self.proc.exitcode} (its error is above)") from None
        self.proc.kill()
        raise WorkerFailed(f"no answer to {' '.join(map(str, command)) or 'start'!r} within {self.timeout_s:g} s")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(("quit",))
        self.proc.join(60)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


def start(b: Bench, peer: str, res: int, workers: int) -> tuple[Worker, dict]:
    """The peer's worker and its greeting (version, half type); Skip with the reason when
    the peer cannot run here."""
    ds, a = b.ds, b.args
    if peer == "classic" and res == SIZE:
        raise Skip(CLASSIC_AT_64)
    if len(ds) < a.batch_size:
        raise Skip(f"split {ds.split!r} has {len(ds)} images, fewer than one batch of {a.batch_size}")
    cache = Path(a.cache).resolve() / "peers"
    spec = Spec(peer=peer, data=str(ds.data_dir.resolve()), split=ds.split, res=res, batch_size=a.batch_size,
                workers=workers, dtype="float16" if a.amp == "fp16" else "bfloat16", cache=str(cache),
                folder=str(split_files(ds, cache, upscale=res if peer == "classic" else None))
                if peer in ("torchvision", "dali-files", "classic") else "")
    w = Worker(spec, Path(a.ffcv_site).resolve(), a.peer_timeout)
    b.on_release(w.close)
    try:
        hello = w.ask()
    except WorkerFailed as e:
        raise WorkerFailed(f"failed to start: {e}") from None
    if "skipped" in hello:
        raise Skip(hello["skipped"])
    return w, hello["ready"]


def peer_consumer(b: Bench, res: int, backend: str, workers: int, **_record_fields):
    """(one epoch in the peer's process -> images, its version and half type, its MAE after the rounds)."""
    w, ready = start(b, backend, res, workers)

    def mae() -> dict:
        answer = w.ask("mae", b.args.mae_images)
        return {"mae_vs_pil": answer["mae"], "mae_images": answer["images"]}
    return (lambda: w.ask("epoch")["images"]), ready, mae


def stage() -> Stage:
    """The peers row: one point a peer of --peers, each record noting the kernel it resizes with."""
    def grid(b: Bench, res: int) -> list[dict]:
        workers = b.args.workers or os.cpu_count() or 1
        return [{"res": res, "backend": p, "kernel": "none (native 64 px)" if res == SIZE else PEERS[p].kernel,
                 "augment": "flip", "workers": workers} for p in PEERS if p in b.args.peers]
    return Stage("peers", lambda p: PEERS[p["backend"]].label, peer_consumer, grid=grid, alternate="peers",
                 fields={"device": "cpu"})
