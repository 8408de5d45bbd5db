"""The training step and evaluation, shared by fasttin.train and fasttin.eval.

Metrics accumulate in device tensors; the host reads them only every `log_every` steps and at
the end of an epoch, so the step itself never waits for the device.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist
from torch import nn

from fasttin.loaders.sampler import PAD_LABEL


class NonFiniteLoss(RuntimeError):
    pass


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
        loss, top1, top5, n = sums.tolist()  # the one host-device synchronisation
        d = max(n, 1)
        return {"loss": loss / d, "acc1": top1 / d, "acc5": top5 / d, "n": int(n)}


def autocast(device: torch.device, amp: str):
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def make_optimizer(model: nn.Module, cfg: dict) -> torch.optim.Optimizer:
    """SGD; weight decay on conv and linear weights only, never on norms and biases."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]
    return torch.optim.SGD([{"params": decay, "weight_decay": cfg["weight_decay"]},
                            {"params": rest, "weight_decay": 0.0}],
                           lr=cfg["lr"], momentum=cfg["momentum"], nesterov=cfg["nesterov"])


def lr_factor(cfg: dict, steps_per_epoch: int):
    """Per-step lr multiplier: StepLR(step_size, gamma) by epoch, or linear warmup then cosine to 0."""
    total = cfg["epochs"] * steps_per_epoch
    warm = int(cfg["warmup_epochs"] * steps_per_epoch)

    def factor(step: int) -> float:
        if cfg["schedule"] == "step":
            return cfg["gamma"] ** (step // steps_per_epoch // cfg["step_size"])
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))
    return factor


def train_epoch(model, loader, optimizer, scheduler, scaler, loss_fn, *, device, amp: str,
                log_every: int = 25, on_log=None, should_stop=lambda: False,
                on_first_step=None) -> tuple[dict, int]:
    """One pass (or the rest of one, after a mid-epoch resume). Returns (metrics, steps done)."""
    model.train()
    meter, steps = Meter(device), 0
    for images, labels in loader:
        with autocast(device, amp):
            logits = model(images)
            loss = loss_fn(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        meter.add(loss.detach() * len(labels), logits.detach(), labels)
        steps += 1
        if steps == 1 and on_first_step is not None:
            on_first_step()
        if on_log is not None and steps % log_every == 0:
            m = meter.read()
            if not math.isfinite(m["loss"]):
                raise NonFiniteLoss(f"training loss became {m['loss']} at step {steps} of the epoch")
            on_log(steps, m)
        if should_stop():
            break
    m = meter.read()
    if not math.isfinite(m["loss"]):
        raise NonFiniteLoss(f"training loss became {m['loss']} in this epoch")
    return m, steps


@torch.no_grad()
def evaluate(model, loader, *, device, amp: str, tta: bool = False) -> dict:
    """loss, top-1, top-5 over the whole split; padding samples (distributed) are not counted."""
    model.eval()
    meter = Meter(device)
    for images, labels in loader:
        with autocast(device, amp):
            logits = model(images).float()
            if tta:
                logits = (logits + model(images.flip(3)).float()) / 2
        loss = nn.functional.cross_entropy(logits, labels, ignore_index=PAD_LABEL, reduction="sum")
        meter.add(loss, logits, labels)
    return meter.read()
