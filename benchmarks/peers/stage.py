"""The peers rows of the benchmark table: fasttin's loaders beside FFCV, DALI's own idiom,
torchvision and the classic pipeline, loader only, on the CPU (`--stages peers`).

Each peer runs in a process of its own (benchmarks.peers.worker) with --workers threads or
workers, so no loader inherits another's state or another's libraries (FFCV's folder is on the
path of its own workers only). The runner times the peers like any alternating group: a warm-up
epoch each, then --repeats rounds of one whole epoch each, the order rotating; the figure is the
median round. After the rounds, each peer's MAE against PIL bicubic on the first --mae-images
images. A peer that is not installed, or whose worker fails or hangs, is a record with `skipped`.
"""
from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path

from benchmarks.peers import worker
from benchmarks.peers.loaders import PEERS, Spec, kernel
from benchmarks.pipelines import image_folder, upscaled_folder
from benchmarks.runner import Bench, Skip, Stage
from fasttin.loaders.augment import SIZE

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SITE = Path(os.environ.get("FASTTIN_PEERS_SITE", ROOT / ".peers-site"))
CLASSIC_AT_64 = "at the native 64 px the classic pipeline is the torchvision one: nothing to upscale"


class WorkerFailed(Skip):
    """A worker that died or hung: its peer becomes a skipped record."""


class Worker:
    """One peer's loader in a spawned process (it inherits none of this one's state or threads);
    each question waits for its answer on a pipe, up to a deadline."""

    def __init__(self, spec: Spec, site: Path, timeout_s: float):
        ctx = mp.get_context("spawn")
        self.conn, theirs = ctx.Pipe()
        self.timeout_s = timeout_s
        self.proc = ctx.Process(target=worker.serve, args=(spec, str(site), theirs), name=f"peer {spec.peer}")
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
        try:
            self.conn.send(("quit",))
        except OSError:
            pass
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
                folder=str(image_folder(ds, cache)) if peer in ("torchvision", "dali-files") else "",
                upscaled=str(upscaled_folder(ds, cache, res)) if peer == "classic" else None)
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
        return [{"res": res, "backend": p, "kernel": kernel(p, res), "augment": "flip",
                 "workers": b.args.workers or os.cpu_count() or 1}
                for p in PEERS if p in b.args.peers]
    return Stage("peers", lambda p: PEERS[p["backend"]].label, peer_consumer, grid=grid, alternate="peers",
                 fields={"device": "cpu"})
