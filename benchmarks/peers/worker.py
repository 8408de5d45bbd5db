"""One peer's loader in a process of its own (benchmarks.peers.stage.Worker spawns it).

The runner sends commands on a pipe; each answer is one dict:
  at start   {"ready": {version, dtype}}, or {"skipped": why} when the peer is not installed
  epoch      one whole epoch (the runner times it): {"images", "shape", "dtype"}
  mae N      {"mae": error, "images": N} on the first N images (see benchmarks.peers.mae)
  quit       exit
"""
from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import sys

import numpy as np
import torch

from benchmarks.peers import mae as mae_mod
from benchmarks.peers.loaders import PEERS, Spec, build, version

HALF = (torch.float16, torch.bfloat16)


def why_unavailable(peer: str) -> str | None:
    """A reason to skip the peer, found before building it (None: try to build it)."""
    if peer in ("fasttin-dali", "dali-files"):
        from fasttin.loaders import dali
        return dali.available()
    if peer.startswith("ffcv-"):
        try:
            import ffcv  # noqa: F401
        except ImportError as e:
            return (f"FFCV is not importable ({type(e).__name__}: {e}); install it with "
                    "benchmarks/peers/setup-ffcv.sh")
    return None


def one_epoch(epoch, spec: Spec) -> dict:
    """One whole epoch, each batch brought to a half-precision NCHW view as a trainer would take it."""
    dtype = getattr(torch, spec.dtype)
    n, shape, out = 0, None, None
    for x in epoch():
        if x.dtype not in HALF:
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
    got = []
    for x in epoch():
        got.append(mae_mod.to_pixels(x))
        if sum(len(g) for g in got) >= n:
            break
    pixels = np.concatenate(got)[:n]
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
    while True:
        try:
            cmd, *args = conn.recv()
        except EOFError:  # the runner is gone: end as at quit
            cmd = "quit"
        if cmd == "epoch":
            conn.send(one_epoch(epoch, spec))
        elif cmd == "mae":
            conn.send(measure_mae(spec, args[0]))
        elif cmd == "quit":
            stop_children()
            return
        else:
            raise ValueError(f"unknown command {cmd!r}")
