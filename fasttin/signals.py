"""SIGINT/SIGTERM stop a training run at a step boundary, so it can save its position.

Under torchrun every rank must stop at the same step, or the others hang in an all-reduce: the
ranks agree at the logging steps (which synchronise anyway) and at the end of each epoch.
"""
from __future__ import annotations

import signal

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Records the first SIGINT/SIGTERM; `agree()` makes it every rank's decision. A context
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

    def agree(self) -> bool:
        """All ranks take the same decision (an all-reduce under torchrun: call at synchronising points)."""
        flag = self.received is not None
        if self.world > 1:
            t = torch.tensor([float(flag)], device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
        self.agreed = flag
        return flag
