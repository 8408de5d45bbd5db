"""The training step, evaluation and the time accounting: one step that fasttin.train, fasttin.eval
and the benchmarks all call, so "end to end" in a benchmark is exactly a training step.

Metrics accumulate in device tensors; the host reads them only every `log_every` steps and at
the end of an epoch, so the step itself never waits for the device. The clock follows the same
rule: CUDA events are recorded around the loader's next() and the step, and read only when the
logging step has synchronised anyway.
"""
from __future__ import annotations

import contextlib
import copy
import math
import time

import torch
import torch.distributed as dist
from torch import nn

from fasttin import mixing
from fasttin.checkpoint import CheckpointError
from fasttin.errors import EXIT_NONFINITE, Reported
from fasttin.loaders.sampler import PAD_LABEL
from fasttin.recipes import AMPS

AMP_DTYPE = dict(zip(AMPS, (torch.bfloat16, torch.float16, torch.float32)))  # the only AMP table


class NonFinite(Reported):
    """The loss or the weights stopped being finite: nothing of this state may be saved."""

    exit_code, word = EXIT_NONFINITE, "stopped"


class Meter:
    """Sums of loss, top-1, top-5 hits and sample count, on the device; all-reduced when read."""

    def __init__(self, device):
        self.sums = torch.zeros(4, device=device, dtype=torch.float64)

    @torch.no_grad()
    def add(self, loss_sum: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        valid = labels != PAD_LABEL
        top5 = logits.topk(min(5, logits.shape[1]), 1).indices
        hit = top5 == labels[:, None]
        self.sums += torch.stack([loss_sum.double(), (hit[:, 0] & valid).sum().double(),
                                  (hit.any(1) & valid).sum().double(), valid.sum().double()])

    def read(self) -> dict:
        sums = self.sums.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
        loss, top1, top5, n = totals = sums.tolist()  # the one host-device synchronisation
        d = max(n, 1)
        return {"loss": loss / d, "acc1": top1 / d, "acc5": top5 / d, "n": int(n), "sums": totals}


def autocast(device, amp: str):
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=AMP_DTYPE[amp])


def make_optimizer(model: nn.Module, cfg: dict) -> torch.optim.Optimizer:
    """SGD; weight decay on conv and linear weights only, never on norms and biases."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]
    return torch.optim.SGD([{"params": decay, "weight_decay": cfg["weight_decay"]},
                            {"params": rest, "weight_decay": 0.0}],
                           lr=cfg["lr"], momentum=cfg["momentum"], nesterov=cfg["nesterov"])


def lr_factor(cfg: dict, steps_per_epoch: int):
    """The lr multiplier at schedule position `step` (the run's optimisation steps so far; a float
    under --budget, where the position comes from the clock): StepLR(step_size, gamma) by epoch, or
    a linear warmup from 0 then cosine or a straight line to 0 at the end of --epochs."""
    total = cfg["epochs"] * steps_per_epoch
    warm = int(cfg["warmup_epochs"] * steps_per_epoch)

    def factor(step: float) -> float:
        if cfg["schedule"] == "step":
            return cfg["gamma"] ** (int(step) // steps_per_epoch // cfg["step_size"])
        if step < warm:
            return (step + 1) / warm
        done = min(1.0, (step - warm) / max(1, total - warm))
        if cfg["schedule"] == "linear":
            return 1.0 - done
        return 0.5 * (1 + math.cos(math.pi * done))
    return factor


class EMA:
    """An exponential moving average of a model's weights (parameters and floating-point buffers,
    the batch-norm statistics included) with no host-device synchronisation. `update()` is called
    after every step; every `every` steps it folds the weights in with one fused lerp at decay**every,
    the same average within rounding for a decay of 0.99 or more, at a fraction of the memory traffic
    (on the CPU a lerp of ResNet18's 45 MB costs several per cent of a step). The decay ramps up as
    min(decay, (1 + t) / (10 + t)) over the first steps t, so that the average does not hold on to the
    random initialisation."""

    def __init__(self, model: nn.Module, decay: float, every: int = 4):
        self.decay, self.every, self.updates = decay, every, 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        pairs = list(zip(self.model.state_dict().values(), model.state_dict().values()))
        self._avg = [m for m, t in pairs if m.is_floating_point()]
        self._src = [t for m, t in pairs if m.is_floating_point()]
        self._copy = [(m, t) for m, t in pairs if not m.is_floating_point()]

    def decay_at(self, t: int) -> float:
        """The decay of update t: the warm-up's (1 + t) / (10 + t) until it reaches `decay`."""
        return min(self.decay, (1 + t) / (10 + t))

    def inert_note(self, steps: int) -> str | None:
        """A line for a run of `steps` steps that ends before `decay` itself applies (see full_decay_step)."""
        if self.full_decay_step() <= steps:
            return None
        return (f"--ema {self.decay:g}: the warm-up's decay (1+t)/(10+t) reaches it only at step "
                f"{self.full_decay_step():,}, after this run's {steps:,}; the average is the warm-up's throughout")

    def full_decay_step(self) -> int:
        """The first update at which `decay` itself applies (0.999: 8,990; 0.99: 890): a shorter run
        averages with the warm-up's decay throughout, whatever --ema says (fasttin.train says so)."""
        n = max(0, math.floor((10 * self.decay - 1) / (1 - self.decay)))  # then past the float rounding
        while self.decay_at(n) < self.decay:
            n += 1
        return n

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        if self.updates % self.every:
            return
        d = self.decay_at(self.updates) ** self.every
        torch._foreach_lerp_(self._avg, self._src, 1.0 - d)
        for m, t in self._copy:
            m.copy_(t)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = state["updates"]


def _no_range(name):
    return contextlib.nullcontext()


class TrainStep:
    """One optimisation step (lr from the schedule's position, autocast, loss, backward, scaler,
    optimizer, EMA, metrics) with no host-device synchronisation. `position()` is the schedule's
    position in steps: the steps taken so far, or under --budget the clock's (`Budget.position`).
    `mark` names the phases for a profiler (off: a no-op)."""

    def __init__(self, model, net, optimizer, scaler, loss_fn, *, device, amp, factor, base_lr, steps_per_epoch,
                 ema: EMA | None = None, memory_format=torch.channels_last, mix: mixing.Mixing | None = None):
        self.model, self.net, self.optimizer, self.ema = model, net, optimizer, ema
        self.mixing = mix or mixing.Mixing()
        self.memory_format = memory_format  # the inputs' too: a conv runs NHWC if its input is
        self.scaler, self.loss_fn, self.device, self.amp = scaler, loss_fn, torch.device(device), amp
        self.factor, self.base_lr, self.steps_per_epoch = factor, base_lr, steps_per_epoch
        self.steps = 0  # optimisation steps taken in the run, resumes included
        self.position = lambda: self.steps
        self.meter = Meter(self.device)
        self.mark = _no_range

    def lr_at(self, position: float) -> float:
        return self.base_lr * self.factor(position)

    def __call__(self, images, labels) -> None:
        lr = self.lr_at(self.position())
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        images = images.contiguous(memory_format=self.memory_format)  # the loaders' NHWC: a no-op by default
        mix = self.mixing.draw(self.steps, *images.shape[2:])  # host arithmetic only: no synchronisation
        if mix is not None:
            images = mixing.apply(images, mix)
        with self.mark("forward"), autocast(self.device, self.amp):
            logits = self.net(images)
            loss = self.loss_fn(logits, labels) if mix is None else mixing.loss(self.loss_fn, logits, labels, mix)
        with self.mark("backward"):
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
        with self.mark("optimizer"):
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.ema is not None:
                self.ema.update()
        self.steps += 1
        counted = labels if mix is None else mixing.counted_labels(labels, mix)
        self.meter.add(loss.detach() * len(labels), logits.detach(), counted)

    def epoch_lr(self, epoch: int) -> float:
        """The lr the 0-based `epoch` of an epoch-based schedule trains at (its first step's)."""
        return self.lr_at(epoch * self.steps_per_epoch)

    def ensure_finite(self, epoch: int) -> None:
        """Every parameter and buffer (and the average's) finite, or NonFinite: one synchronisation,
        before a save only, so nothing non-finite is ever kept."""
        tensors = [*self.model.state_dict().values(), *(self.ema.model.state_dict().values() if self.ema else ())]
        flags = [torch.isfinite(t).all() for t in tensors if t.is_floating_point()]
        if flags and not bool(torch.stack(flags).all()):
            raise NonFinite(f"the weights became non-finite in epoch {epoch + 1}; they were not saved")

    def state_dict(self) -> dict:
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scaler": self.scaler.state_dict(), "steps": self.steps}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def load_state_dict(self, state: dict, where="the checkpoint") -> None:
        """A checkpoint's step state; one without "steps" (an earlier fasttin's) has its LambdaLR's count.
        A missing entry is a CheckpointError naming `where`."""
        try:
            self._load(state)
        except KeyError as e:
            raise CheckpointError(f"{where} has no {e} entry: damaged, or of other settings") from None

    def _load(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.steps = state["steps"] if "steps" in state else state["scheduler"]["last_epoch"]
        if self.ema is not None:
            if "ema" not in state:
                raise KeyError("ema")
            self.ema.load_state_dict(state["ema"])


def make_step(model, cfg: dict, *, device, steps_per_epoch: int, world: int = 1) -> TrainStep:
    """The model on `device` (channels_last per cfg), DDP when world > 1, compiled per cfg, with
    SGD, the lr schedule, a GradScaler (fp16 only), label-smoothed cross-entropy and the EMA (--ema)."""
    device = torch.device(device)
    fmt = torch.channels_last if cfg["channels_last"] else torch.contiguous_format
    model = model.to(device, memory_format=fmt)
    wrapped = model
    if world > 1:
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                      else None)
    # dynamic=False: a run has a few fixed shapes (a resolution schedule, evaluation padded to the
    # batch), each best compiled static; automatic dynamic shapes recompile them as dynamic graphs
    net = torch.compile(wrapped, mode=cfg["compile"], dynamic=False) if cfg.get("compile") else wrapped
    optimizer = make_optimizer(model, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg["amp"] == "fp16")
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg["label_smoothing"])
    ema = EMA(model, cfg["ema"]) if cfg.get("ema") else None
    return TrainStep(model, net, optimizer, scaler, loss_fn, device=device, amp=cfg["amp"],
                     factor=lr_factor(cfg, steps_per_epoch), base_lr=cfg["lr"], steps_per_epoch=steps_per_epoch,
                     ema=ema, memory_format=fmt, mix=mixing.Mixing.of(cfg))


class Budget:
    """--budget: the schedule's position from the clock. The run may spend `minutes` on training,
    validation and checkpoints; the last step comes `reserve` seconds before the end (the final
    validation and checkpoint, measured each epoch), and the position runs from 0 to the nominal
    schedule's last step over the time before it. `spent` (seconds) carries over a resume.

    Under torchrun the ranks must step with one lr and stop at one step: there the clock is read
    only at the logging steps, every `sync_every` steps (`share_clock`, which all-reduces it); a
    single process reads it every step.
    """

    def __init__(self, minutes: float, total_steps: int, *, spent: float = 0.0, reserve: float = 0.0,
                 world: int = 1, device="cpu", sync_every: int = 1):
        self.seconds, self.total_steps, self.world, self.device = minutes * 60, total_steps, world, device
        self.spent_before, self.started = spent, time.perf_counter()
        self.reserve = reserve  # seconds kept for the final validation and checkpoint
        self.agreed = (spent, reserve, 0.0)  # (spent, reserve, save_s) as of the last agreement (torchrun)
        self.sync_every = sync_every if world > 1 else 1  # steps between two readings of the clock
        self.eval_s = self.save_s = self.step_room = 0.0  # the longest validation, save, and steps between readings
        self.kept = None  # the reserve the last epoch's steps ran with (what its end had kept), once one closed

    @classmethod
    def resumed(cls, minutes: float, total_steps: int, pos, **kw) -> Budget:
        """The budget of a run at position `pos` (checkpoint.Position): the spent time and reserve
        last.pt keeps, which at an epoch's end are those its end was decided by (`close_epoch`)."""
        return cls(minutes, total_steps, spent=pos.budget_spent_s, reserve=pos.budget_reserve_s, **kw)

    def start_clock(self) -> None:
        """This process's clock runs from here: the set-up before training is not the budget's."""
        self.started = time.perf_counter()

    def close_epoch(self, row: dict, steps: int) -> bool:
        """After an epoch's validation, before its checkpoint: keep room (`_keep_room`), then decide
        once whether the budget is spent by the end of the save that follows. The row (and last.pt,
        saved next) records the figures decided by, so a resume decides the same. Under torchrun
        every rank calls it: the clocks are agreed here, and the decision is the agreed figures'."""
        self.kept = self._reserve()
        step_s = (row["data_wait_s"] + row["compute_s"]) / max(steps, 1)
        self.eval_s = max(self.eval_s, row["eval_s"])
        self.step_room = max(self.step_room, step_s * min(self.sync_every, max(steps, 1)))
        self._keep_room()
        self.share_clock()
        spent, reserve, save_s = self.agreed if self.world > 1 else (self.local_spent(), self.reserve, self.save_s)
        spent += save_s  # to the end of the save that follows, taken as long as the longest so far
        row.update(budget_spent_s=spent, budget_reserve_s=reserve)
        return self._fraction(spent, reserve) >= 1.0

    def saved(self, seconds: float) -> None:
        """A checkpoint save took `seconds`."""
        self.save_s = max(self.save_s, seconds)
        self._keep_room()

    def _keep_room(self) -> None:
        """Room for a final validation and checkpoint as long as the longest so far, with a quarter
        more, and for the steps until the clock is read again (one; under torchrun, to the next
        logging step or the epoch's end)."""
        self.reserve = max(self.reserve, 1.25 * (self.eval_s + self.save_s) + self.step_room)

    def figures(self, row: dict | None = None) -> dict:
        """The spent seconds and reserve that last.pt keeps: at an epoch's end those its end was
        decided by (`row`'s, from `close_epoch`), at a stop within an epoch the clock's."""
        if row is not None:
            return {k: row[k] for k in ("budget_spent_s", "budget_reserve_s")}
        return {"budget_spent_s": max(self.local_spent(), self.agreed[0]),
                "budget_reserve_s": max(self.reserve, self.agreed[1])}

    def overrun_note(self, spent: float) -> str | None:
        """A line when the run spent more than its budget: the budget ended in the first epoch, before
        a validation and a save were timed, or the machine slowed after the last decision."""
        if spent <= self.seconds:
            return None
        over = f"the budget ran over by {spent - self.seconds:.1f} s"
        if self.kept is None:  # its last epoch closed in an earlier process
            return over
        over += ": "
        if not self.kept:
            return over + ("it ended in the first epoch, before a validation and checkpoint were timed, so no time "
                           "was kept for them")
        return over + f"the last steps, validation and checkpoint took longer than the {self.kept:.1f} s kept for them"

    def local_spent(self) -> float:
        """Seconds spent by this process's clock, resumes included."""
        return self.spent_before + time.perf_counter() - self.started

    def spent(self) -> float:
        """Seconds spent, as the schedule sees them (under torchrun: the last agreed clock)."""
        return self.agreed[0] if self.world > 1 else self.local_spent()

    def _reserve(self) -> float:
        return self.agreed[1] if self.world > 1 else self.reserve

    def share_clock(self) -> None:
        """Every rank adopts the largest clock, reserve and save (torchrun, at the synchronising steps)."""
        if self.world > 1:
            t = torch.tensor([self.local_spent(), self.reserve, self.save_s], dtype=torch.float64, device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            self.agreed = tuple(t.tolist())

    def _fraction(self, spent: float, reserve: float) -> float:
        return min(1.0, spent / max(self.seconds - reserve, 1e-9))

    def fraction(self) -> float:
        """How far the run is, 0 to 1, by the clock."""
        return self._fraction(self.spent(), self._reserve())

    def position(self) -> float:
        return self.total_steps * self.fraction()

    def exhausted(self) -> bool:
        return self.fraction() >= 1.0


class StepClock:
    """Where the training time goes, without a host-device synchronisation of its own.

    Intervals are contiguous: data wait runs from the end of the previous step (or the epoch's
    start) to the return of the loader's next(); compute from there to the end of the step. On
    CUDA the bounds are events, read by `collect()` only after a synchronisation (logging steps,
    the epoch's end); on the CPU they are wall time.
    """

    def __init__(self, device="cpu"):
        self.cuda = torch.device(device).type == "cuda"
        self.totals = {"data_wait_s": 0.0, "compute_s": 0.0}
        self.first_compute_s = None  # the first step's compute: with --compile, the compilation
        self._marks: list = []  # (kind, event or time): the end of a data wait or of a step

    def _now(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def carry(self, part: dict | None) -> float:
        """Start an epoch's totals from `part`, the times of its part a stopped process did (a
        checkpoint's "partial"; None: from zero); returns that part's wall seconds."""
        self.totals = {k: part[k] if part else 0.0 for k in self.totals}
        return part["epoch_s"] if part else 0.0

    def start(self) -> None:
        self._marks = [("start", self._now())]

    def data_ready(self) -> None:
        self._marks.append(("data_wait_s", self._now()))

    def step_done(self) -> None:
        self._marks.append(("compute_s", self._now()))

    def collect(self) -> None:
        """Fold the marks into the totals; on CUDA only after the device has synchronised."""
        marks = self._marks
        for (_, a), (kind, b) in zip(marks, marks[1:]):
            s = a.elapsed_time(b) / 1000 if self.cuda else b - a
            if kind == "compute_s" and self.first_compute_s is None:
                self.first_compute_s = s
            self.totals[kind] += s
        self._marks = marks[-1:]

    def take(self, spanning: float | None = None) -> dict:
        """The totals since the last take (an epoch's), and reset. Given `spanning`, the training
        phase's wall time, its time outside the steps (the epoch's set-up, the logging steps' work)
        counts as data wait, the model having waited: the parts then add up to the phase."""
        out, self.totals = self.totals, {"data_wait_s": 0.0, "compute_s": 0.0}
        if spanning is not None:
            out["data_wait_s"] += max(0.0, spanning - out["data_wait_s"] - out["compute_s"])
        return out


def _check(m: dict, where: str) -> dict:
    if not math.isfinite(m["loss"]):
        raise NonFinite(f"the training loss became {m['loss']} {where}")
    return m


def train_epoch(step: TrainStep, loader, *, clock: StepClock | None = None, log_every: int = 25, on_log=None,
                should_stop=lambda: False, max_steps=None, on_step=None, carry=None) -> tuple[dict, int]:
    """One pass (or the rest of one, after a mid-epoch resume, or `max_steps`). Returns (metrics,
    steps done). `on_log(steps, metrics)` runs at the logging steps, `on_step(steps)` after each step;
    `carry`, the metrics' "sums" of the part of the epoch done before a resume, counts that part too."""
    step.net.train()
    step.meter = Meter(step.device)
    if carry is not None:
        step.meter.sums += torch.tensor(carry, dtype=torch.float64, device=step.device)
    steps, batches = 0, iter(loader)
    if clock is not None:
        clock.start()
    while max_steps is None or steps < max_steps:
        with step.mark("load"):
            batch = next(batches, None)
        if batch is None:
            break
        if clock is not None:
            clock.data_ready()
        step(*batch)
        steps += 1
        if clock is not None:
            clock.step_done()
        if on_step is not None:
            on_step(steps)
        if steps % log_every == 0 and (on_log is not None or clock is not None):
            m = _check(step.meter.read(), f"at step {steps} of the epoch")  # synchronises
            if clock is not None:
                clock.collect()
            if on_log is not None:
                on_log(steps, m)
        if should_stop():
            break
    m = _check(step.meter.read(), "in this epoch")
    if clock is not None:
        clock.collect()
    return m, steps


@torch.no_grad()
def evaluate(net, loader, *, device, amp: str, tta: bool = False, channels_last: bool = True,
             pad_to: int = 0) -> dict:
    """loss, top-1, top-5 over the whole split; padding samples (distributed) are not counted. A
    batch shorter than `pad_to` is padded to it (zero images labelled PAD_LABEL, not counted; in
    eval mode each sample's logits are its own), so a compiled net sees one shape."""
    net.eval()
    meter = Meter(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for images, labels in loader:
        if len(labels) < pad_to:
            more = pad_to - len(labels)
            images = torch.cat([images, images.new_zeros((more, *images.shape[1:]))])
            labels = torch.cat([labels, labels.new_full((more,), PAD_LABEL)])
        images = images.contiguous(memory_format=fmt)
        with autocast(device, amp):
            logits = net(images).float()
            if tta:
                logits = (logits + net(images.flip(3)).float()) / 2
        loss = nn.functional.cross_entropy(logits, labels, ignore_index=PAD_LABEL, reduction="sum")
        meter.add(loss, logits, labels)
    return meter.read()


SHARE_KEYS = ("data_wait", "compute", "eval", "checkpoint")


def shares(times: dict, total_s: float) -> dict:
    """Each accounted time as a share of `total_s` (the epoch's or the run's wall time)."""
    return {f"{k}_share": times.get(f"{k}_s", 0.0) / max(total_s, 1e-9) for k in SHARE_KEYS}


def verdict(shares: dict, **context) -> str:
    """One line: what binds the run and what to try. `shares` holds the fractions data_wait,
    compute, eval, checkpoint and compile (of the run's time); context may give backend,
    better_backend (e.g. "the split fits on cuda:0 (1.2 GiB): try --backend resident"), tta, and
    faster: the flags that are faster on this machine (tuning.faster), the only ones it advises."""
    s = {k: shares.get(k, 0.0) for k in (*SHARE_KEYS, "compile")}
    backend = context.get("backend") or "the"
    if s["compile"] > 0.3:
        return (f"compile-bound: compiling took {s['compile']:.0%} of this short run; train longer for "
                "--compile to pay off, or drop it")
    if s["data_wait"] > 0.2:
        try_ = context.get("better_backend") or ("try more --workers, or a lower --res" if backend != "resident"
                                                 else "the resident loader is waiting: try a lower --res")
        return f"data-bound: {s['data_wait']:.0%} of the time waiting for the {backend} loader; {try_}"
    if s["eval"] + s["checkpoint"] > 0.25:
        heavy = "eval" if s["eval"] >= s["checkpoint"] else "checkpoint"
        tip = ("validation runs once per epoch over the whole split" + ("; --no-tta halves it"
                                                                        if context.get("tta") else "")
               if heavy == "eval" else "checkpoints are saved every epoch: a faster disk for --out helps")
        return (f"{heavy}-heavy: {s['eval']:.0%} of the time in validation, {s['checkpoint']:.0%} saving "
                f"checkpoints; {tip}")
    tips = context.get("faster") or []
    tail = f"; try {', '.join(tips)}" if tips else ""
    return f"compute-bound: the loader waited {s['data_wait']:.1%} of the time{tail}"
