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
