"""run_peers: fasttin's loaders side by side with the loaders users would otherwise choose.

Loader only, CPU. Each loader runs in a process of its own (benchmarks.peers.worker) with the same
number of threads or workers, so no loader inherits another's state. Whole epochs, flip, a half
precision NCHW-view batch out. After one warm-up epoch each, the loaders alternate: in round r
every loader does one epoch in turn (the order rotating by one each round), so all share the
machine's state; each figure is the median of its rounds. Then each loader's MAE against PIL
bicubic. A peer that is not installed, or whose worker fails, is a record with `skipped`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import select
import statistics
import subprocess
import sys
from pathlib import Path

from benchmarks.peers.loaders import PEERS, Spec, kernel
from benchmarks.pipelines import image_folder, upscaled_folder
from benchmarks.runner import record, rotation
from fasttin.errors import UserError
from fasttin.loaders.augment import SIZE

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SITE = Path(os.environ.get("FASTTIN_PEERS_SITE", ROOT / ".peers-site"))
CLASSIC_AT_64 = "at the native 64 px the classic pipeline is the torchvision one: nothing to upscale"


class WorkerFailed(Exception):
    """A worker that died, hung or answered nonsense: its peer becomes a skipped record."""


class Worker:
    """One peer's worker process; each question waits for its one-line answer, up to a deadline."""

    def __init__(self, spec: Spec, site: Path, timeout_s: float):
        # FFCV's folder only for the FFCV workers: nothing else may see its numba or its build
        paths = [str(ROOT)] + ([str(site)] if spec.peer.startswith("ffcv-") else [])
        if os.environ.get("PYTHONPATH"):
            paths.append(os.environ["PYTHONPATH"])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
        self.peer, self.timeout_s = spec.peer, timeout_s
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.peers.worker",
                                      json.dumps(dataclasses.asdict(spec))],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, cwd=ROOT, env=env)

    def ask(self, command: str | None = None) -> dict:
        """Send `command` (None: just read the greeting) and return the answer."""
        try:
            if command:
                self.proc.stdin.write(command.encode() + b"\n")
        except BrokenPipeError:
            raise WorkerFailed(f"worker exited with status {self.proc.wait()} (its error is above)") from None
        if not select.select([self.proc.stdout], [], [], self.timeout_s)[0]:
            self.proc.kill()
            raise WorkerFailed(f"no answer to {command or 'start'!r} within {self.timeout_s:.0f} s")
        line = self.proc.stdout.readline()  # unbuffered: select saw exactly what is left to read
        if not line.endswith(b"\n"):
            raise WorkerFailed(f"worker exited with status {self.proc.wait()} (its error is above)")
        return json.loads(line)

    def close(self) -> None:
        try:
            self.proc.stdin.write(b"quit\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        except (BrokenPipeError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()


def _record(peer: str, res: int, batch_size: int, workers: int, **fields) -> dict:
    """A peer's record in the benchmark's one schema (runner.record)."""
    return record("peers", PEERS[peer].label, backend=peer, res=res, batch_size=batch_size, device="cpu",
                  kernel=kernel(peer, res), augment="flip", workers=workers, **fields)


def _log(rec: dict) -> None:
    shown = f"skipped: {rec['skipped']}" if rec.get("skipped") else (
        f"{rec['img_per_s']:,.0f} img/s, MAE {rec.get('mae_vs_pil', float('nan')):.2f}")
    print(f"  peers    {rec['backend']:18s} res {rec['res']:>4d}  {shown}", file=sys.stderr, flush=True)


def _start(specs: dict, records: dict, site: Path, timeout_s: float) -> dict:
    """Start each peer's worker in turn; returns the live ones, marks the others skipped."""
    live = {}
    for peer, spec in specs.items():
        w = Worker(spec, site, timeout_s)
        try:
            hello = w.ask()
        except WorkerFailed as e:
            records[peer]["skipped"] = f"failed to start: {e}"
            continue
        if "skipped" in hello:
            records[peer]["skipped"] = hello["skipped"]
            w.close()
            continue
        records[peer].update(hello["ready"])
        live[peer] = w
    return live


def _rounds(live: dict, records: dict, rounds: int, mae_images: int) -> None:
    """Warm-up epoch each, then `rounds` alternating rounds, then the MAE of each."""
    runs = {peer: [] for peer in live}

    def ask(peer: str, command: str) -> dict | None:
        try:
            return live[peer].ask(command)
        except WorkerFailed as e:
            records[peer]["skipped"] = f"failed: {e}"
            live.pop(peer).close()
            return None

    for peer in list(live):
        ask(peer, "epoch")
    for r in range(rounds):
        for peer in rotation(list(live), r):
            answer = ask(peer, "epoch")
            if answer:
                runs[peer].append(answer["images"] / answer["seconds"])
        print(f"  peers    round {r + 1}/{rounds}: " + ", ".join(f"{p} {runs[p][-1]:,.0f}" for p in live if runs[p]),
              file=sys.stderr, flush=True)
    for peer in list(live):
        answer = ask(peer, f"mae {mae_images}")
        if answer:
            records[peer].update(mae_vs_pil=answer["mae"], mae_images=answer["images"])
    for peer, rates in runs.items():
        if peer in live and rates:
            records[peer].update(img_per_s=statistics.median(rates), repeats=len(rates), runs=rates)


def run_resolution(ds, res: int, peers: list[str], *, batch_size: int, rounds: int, workers: int, dtype: str,
                   cache: Path, mae_images: int, site: Path, timeout_s: float) -> list[dict]:
    records = {p: _record(p, res, batch_size, workers) for p in peers}
    if res == SIZE and "classic" in records:
        records["classic"]["skipped"] = CLASSIC_AT_64
    todo = [p for p in peers if "skipped" not in records[p]]
    folder = image_folder(ds, cache)
    upscaled = upscaled_folder(ds, cache, res) if "classic" in todo else None
    specs = {p: Spec(peer=p, data=str(ds.data_dir.resolve()), split=ds.split, res=res, batch_size=batch_size,
                     workers=workers, dtype=dtype, cache=str(cache), folder=str(folder),
                     upscaled=str(upscaled) if upscaled else None) for p in todo}
    live = _start(specs, records, site, timeout_s)
    try:
        _rounds(live, records, rounds, mae_images)
    finally:
        for w in live.values():
            w.close()
    ffcv = records.get("ffcv-raw", {}).get("img_per_s")
    for rec in records.values():
        if ffcv and rec["img_per_s"]:
            rec["vs_ffcv_raw"] = rec["img_per_s"] / ffcv
        _log(rec)
    return list(records.values())


def run_peers(data, split: str = "val", resolutions=(64, 224), *, batch_size: int = 100, rounds: int = 7,
              workers: int = 2, dtype: str = "bfloat16", cache="bench-out/cache/peers", mae_images: int = 500,
              peers=None, ffcv_site=None, timeout_s: float = 1800) -> list[dict]:
    """The `peers` stage: one record per peer and resolution (see the module docstring).

    peers: names from PEERS (default all); dtype: the half type of the loaders that can choose it
    (FFCV and DALI give float16); ffcv_site: the folder setup-ffcv.sh installed FFCV into.
    """
    from fasttin.shards import open_split
    peers = list(PEERS) if peers is None else list(peers)
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        raise UserError(f"unknown peer {', '.join(unknown)}: choose from {', '.join(PEERS)}")
    if dtype not in ("bfloat16", "float16"):
        raise UserError(f"dtype must be bfloat16 or float16, got {dtype!r}")
    try:
        ds = open_split(data, split)
    except (OSError, ValueError) as e:  # a missing folder, a bad manifest (FormatError), an unknown split
        raise UserError(str(e)) from None
    if len(ds) < batch_size:
        raise UserError(f"split {split!r} of {data} has {len(ds)} images, fewer than one batch of {batch_size}")
    cache = Path(cache).resolve()
    site = Path(ffcv_site).resolve() if ffcv_site else DEFAULT_SITE
    out = []
    for res in resolutions:
        out += run_resolution(ds, res, peers, batch_size=batch_size, rounds=rounds, workers=workers, dtype=dtype,
                              cache=cache, mae_images=mae_images, site=site, timeout_s=timeout_s)
    return out
