"""The processes of a run: torchrun's ranks set up, and the stop every rank takes together.

SIGINT/SIGTERM stop a training run at a step boundary, so it can save its position. Under torchrun
every rank must stop at the same step, or the others hang in an all-reduce: the ranks agree at the
logging steps (which synchronise anyway) and at the end of each epoch.
"""
from __future__ import annotations

import os
import signal

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def setup(cuda: bool) -> tuple[int, int, torch.device]:
    """(rank, world_size, device) from torchrun's environment, or a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    # torchrun's agent keeps one store across restarts (--max-restarts): without a prefix per attempt,
    # a restarted rank can read the dead attempt's gloo/NCCL addresses and fail to connect, or hang.
    store, rank, size = next(dist.rendezvous("env://"))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group("nccl" if cuda else "gloo", store=dist.PrefixStore(f"fasttin/attempt{attempt}", store),
                            rank=rank, world_size=size)
    return dist.get_rank(), world, torch.device(f"cuda:{local}" if cuda else "cpu")


def teardown(together: bool = False) -> None:
    """The process group destroyed; `together` (a run that ended normally on every rank): first a
    barrier, so that no rank closes its gloo connections while another still uses them (a rank that
    left early was seen to die of SIGABRT at exit, 1 run in about 10). Idempotent."""
    if dist.is_available() and dist.is_initialized():
        if together:
            dist.barrier()
        dist.destroy_process_group()


class StopRequest:
    """Records the first SIGINT/SIGTERM; `decide()` makes it every rank's decision. A context
    manager: the previous handlers come back on exit."""

    def __init__(self, world: int = 1, device: torch.device | str = "cpu"):
        self.world, self.device = world, torch.device(device)
        self.received: str | None = None  # the signal this process got
        self.agreed = False  # all ranks know (single process: as soon as received)
        self._old: dict = {}

    def __enter__(self):
        self._old = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False

    def _handle(self, signum, frame) -> None:
        self.received = self.received or signal.Signals(signum).name

    @property
    def name(self) -> str:
        return self.received or "SIGTERM"  # a rank that got none stops for the one that did

    def should_stop(self) -> bool:
        """Cheap, called after every step: the local signal alone, or the agreed one under torchrun."""
        return self.agreed if self.world > 1 else self.received is not None

    def decide(self) -> bool:
        """All ranks take the same decision (an all-reduce under torchrun: call at synchronising points)."""
        flag = self.received is not None
        if self.world > 1:
            t = torch.tensor([float(flag)], device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
        self.agreed = flag
        return flag
