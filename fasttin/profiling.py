"""--profile STEPS: torch.profiler over STEPS training steps after a warm-up, written to the run
folder as a Chrome/Perfetto trace (opens in ui.perfetto.dev, chrome://tracing or TensorBoard)
and a table of the top operators by self time. The step's phases (load, forward, backward,
optimizer) appear as named ranges in the trace and, on CUDA, as NVTX ranges that nsys shows.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, record_function

from fasttin.fileio import write_atomic, write_with


def phase_ranges(device: torch.device):
    """A `mark(name)` for TrainStep: a profiler range, plus an NVTX range on CUDA."""
    cuda = torch.device(device).type == "cuda"

    @contextlib.contextmanager
    def mark(name: str):
        with record_function(name):
            if cuda:
                torch.cuda.nvtx.range_push(name)
            try:
                yield
            finally:
                if cuda:
                    torch.cuda.nvtx.range_pop()
    return mark


class StepProfiler:
    """Profiles steps warmup+1 .. warmup+steps of the run (counted from this invocation's first
    step), then writes profile/trace.json and profile/top_ops.txt into `folder`."""

    def __init__(self, steps: int, folder: Path, device: torch.device, warmup: int = 5, log=print):
        self.steps, self.warmup, self.device, self.log = steps, warmup, torch.device(device), log
        self.folder = Path(folder) / "profile"
        self.count, self.prof, self.done = 0, None, False

    def attach(self, step) -> StepProfiler:
        step.mark = phase_ranges(self.device)
        return self

    def on_step(self, _steps_in_epoch: int = 0) -> None:
        if self.done:
            return
        self.count += 1
        if self.count == self.warmup:
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self.prof = torch.profiler.profile(activities=acts, record_shapes=True)
            self.prof.start()
        elif self.prof is not None and self.count >= self.warmup + self.steps:
            self.finish()

    def finish(self) -> None:
        """Stop and write what was recorded (also at the end of a run shorter than the window)."""
        if self.done or self.prof is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.prof.stop()
        self.done = True
        self.folder.mkdir(parents=True, exist_ok=True)
        trace = self.folder / "trace.json"
        write_with(trace, lambda tmp: self.prof.export_chrome_trace(str(tmp)))
        sort = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        table = self.prof.key_averages().table(sort_by=sort, row_limit=25)
        write_atomic(self.folder / "top_ops.txt", (table + "\n").encode())
        self.log(f"profile of {self.count - self.warmup} step(s): {trace} (ui.perfetto.dev or TensorBoard) "
                 f"and {self.folder / 'top_ops.txt'} (top operators by self time)")
