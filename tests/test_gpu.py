"""GPU-only paths (DALI's mixed decoder and GPU resize, resident on the device, a CUDA training
run). Skipped cleanly without a CUDA device; benchmarks/gpu.sh runs the same checks at scale."""
import json

import pytest
import torch
from helpers import run_cli

from benchmarks.gpu_checks import check_agreement, check_epochs, check_training

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def ran_and_passed(out: list) -> bool:
    """Every check passed or was skipped for a missing need (DALI), and resident always ran."""
    return all(r["ok"] is not False for r in out) and any(r["ok"] for r in out if r["check"].startswith("resident"))


def test_device_backends_agree_with_their_cpu_references(packed):
    out = []
    check_agreement(packed, torch.device("cuda"), out)
    assert ran_and_passed(out), out


def test_exact_epochs_on_the_device(packed):
    out = []
    check_epochs(packed, torch.device("cuda"), out)
    assert ran_and_passed(out), out


def test_training_steps_bring_the_loss_down(learnable):
    out = []
    check_training(learnable, torch.device("cuda"), 60, "seed-64-scratch", out)
    assert ran_and_passed(out), out


def test_train_command_on_cuda_with_compile(learnable, tmp_path):
    r = run_cli("fasttin.train", "--data", learnable, "--out", tmp_path, "--recipe", "fast", "--res", "64",
                "--epochs", "3", "--batch-size", "128", "--lr", "0.2", "--compile")
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["compile_s"] > 0 and s["best_val_acc1"] > 0.5


def test_side_stream_batches_are_never_read_before_their_event(packed):
    """The resident loader's side stream on CUDA: each batch handed out equals the same batch made
    without it (no read before its event), while the consumer's stream is kept busy."""
    from fasttin.loaders import make_loader
    kw = dict(backend="resident", res=224, batch_size=64, device="cuda", augment="flip", seed=5, return_index=True,
              dtype=torch.bfloat16)
    ahead = make_loader(packed, "train", **kw)
    plain = make_loader(packed, "train", **kw)
    plain.streams = lambda: None
    busy = torch.randn(4096, 4096, device="cuda")
    for (xa, ya, ia), (xb, yb, ib) in zip(ahead, plain):
        busy @ busy  # the consumer's stream behind: a batch read early would show here
        assert torch.equal(ia, ib) and torch.equal(ya, yb) and torch.equal(xa, xb)
    assert ahead.streams() is not None  # the side stream ran


def test_no_host_device_sync_in_the_training_step(learnable):
    """20 training steps over the resident loader under torch's sync debug mode "error": a
    synchronising call in the step or the loader fails the test."""
    from fasttin.loaders import make_loader
    from fasttin.loop import AMP_DTYPE, make_step
    from fasttin.model import build_model
    from fasttin.recipes import resolve
    cfg = resolve("seed-64-scratch", res=64, batch_size=32, amp="bf16", channels_last=True)
    ld = make_loader(learnable, "train", backend="resident", res=64, batch_size=32, device="cuda",
                     dtype=AMP_DTYPE["bf16"], drop_last=True)
    step = make_step(build_model(len(ld.ds.classes), "imagenet"), cfg, device="cuda", steps_per_epoch=len(ld))
    batches = iter(ld)
    step(*next(batches))  # the first step allocates and may synchronise once
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _, (x, y) in zip(range(20), batches):
            step(x, y)
    finally:
        torch.cuda.set_sync_debug_mode("default")
