"""Forked workers, made one way: the decoding pools (the packer's, the resident store's, the
benchmarks') and the DataLoader workers of the pil backend and the classic pipeline.

A forked child inherits the parent's memory, garbage included, but none of its threads. A
collection in the child that finalises an unreachable object of the parent's (a dropped DALI
pipeline, whose destructor waits on its executor's threads) hangs the child for ever, and its
pool with it: so the parent collects right before it forks (`before_fork`). And a child inherits
the command's signal handlers, which are the parent's business (`pool_worker_signals`).
"""
from __future__ import annotations

import gc
import multiprocessing as mp
import signal


def pool_worker_signals(*_) -> None:
    """The initializer of every forked multiprocessing pool: a worker dies on SIGTERM and leaves
    SIGINT to its parent. Inherited, a command's SIGTERM handler made Pool.terminate() print a
    worker's KeyboardInterrupt traceback, or wait forever for a worker blocked on the task queue's lock."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def before_fork() -> None:
    """Right before forking: finalise the unreachable objects here, in the parent, where their threads are."""
    gc.collect()


def fork_pool(workers: int, initializer=pool_worker_signals, initargs=()):
    """A forked multiprocessing pool of `workers`, collected first; `initializer` must set the
    workers' signals (pool_worker_signals, or call it)."""
    before_fork()
    return mp.get_context("fork").Pool(workers, initializer, initargs)
