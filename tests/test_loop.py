"""fasttin.loop and the settings table, in-process on the CPU: the step schedule's logged lr, the
time accounting, the verdict rules, --profile's trace, and one flag per setting."""
import json
import time

import pytest
import torch

from fasttin.loop import StepClock, make_step, shares, train_epoch, verdict
from fasttin.model import build_model
from fasttin.profiling import StepProfiler
from fasttin.recipes import BASE, SETTINGS, resolve
from fasttin.train import parser, settings


def tiny_step(**over):
    cfg = {**resolve("seed-64-scratch", res=32, batch_size=8, lr=0.01), "amp": "off", **over}
    return make_step(build_model(10, "imagenet"), cfg, device="cpu", steps_per_epoch=3)


def batches(n, wait=0.0):
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        time.sleep(wait)  # a loader that makes the step wait
        yield torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)


def test_logged_lr_is_the_lr_the_epoch_trained_at():
    """StepLR(7): epoch 7 (1-based) trains at 1e-3, epoch 8 at 1e-4; read off the real scheduler."""
    step = tiny_step(lr=1e-3, step_size=7, gamma=0.1)
    seen = []
    for _epoch in range(9):
        seen.append(step.optimizer.param_groups[0]["lr"])  # what the epoch's first step uses
        for _ in range(3):
            step.optimizer.step()
            step.scheduler.step()
    assert [step.epoch_lr(e) for e in range(9)] == pytest.approx(seen)
    assert step.epoch_lr(6) == pytest.approx(1e-3) and step.epoch_lr(7) == pytest.approx(1e-4)


def test_clock_accounts_for_the_whole_epoch():
    """data wait + compute cover train_epoch's wall time (within 2%), and the wait is the loader's."""
    step, clock = tiny_step(), StepClock("cpu")
    t0 = time.perf_counter()
    _, n = train_epoch(step, batches(6, wait=0.05), clock=clock, log_every=2)
    wall = time.perf_counter() - t0
    t = clock.take()
    assert n == 6 and abs(t["data_wait_s"] + t["compute_s"] - wall) < 0.02 * wall
    assert t["data_wait_s"] >= 6 * 0.05
    s = shares({**t, "eval_s": 0.0, "checkpoint_s": 0.0}, wall)
    assert sum(s.values()) == pytest.approx(1.0, abs=0.02)


def test_train_epoch_without_a_clock_and_max_steps():
    step = tiny_step()
    m, n = train_epoch(step, batches(5), max_steps=3)
    assert n == 3 and m["n"] == 24


@pytest.mark.parametrize("sh, ctx, starts, needle", [
    ({"data_wait": 0.31, "compute": 0.6}, {"backend": "pil", "better_backend":
                                           "the split fits on cuda:0 (1.20 GiB): try --backend resident"},
     "data-bound", "try --backend resident"),
    ({"data_wait": 0.4, "compute": 0.5}, {"backend": "resident"}, "data-bound", "lower --res"),
    ({"data_wait": 0.004, "compute": 0.95}, {"device": "cuda", "amp": "bf16"}, "compute-bound", "0.4%"),
    ({"data_wait": 0.01, "compute": 0.9}, {"amp": "off"}, "compute-bound", "--amp bf16"),
    ({"data_wait": 0.02, "compute": 0.5, "eval": 0.4}, {"tta": True}, "eval-heavy", "--no-tta"),
    ({"data_wait": 0.02, "compute": 0.6, "checkpoint": 0.3}, {}, "checkpoint-heavy", "disk"),
    ({"data_wait": 0.3, "compute": 0.6, "compile": 0.5}, {}, "compile-bound", "train longer"),
])
def test_verdict_rules(sh, ctx, starts, needle):
    line = verdict(sh, **ctx)
    assert line.startswith(starts) and needle in line and "\n" not in line


@pytest.mark.slow
def test_profiler_writes_a_readable_trace_on_the_cpu(tmp_path):
    step = tiny_step()
    prof = StepProfiler(2, tmp_path, torch.device("cpu"), warmup=1, say=lambda *a: None)
    prof.attach(step)
    train_epoch(step, batches(5), on_step=prof.on_step)
    prof.finish()
    trace = json.loads((tmp_path / "profile" / "trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"forward", "backward", "optimizer", "load"} <= names
    assert any(n and n.startswith("aten::") for n in names)
    assert "Self CPU" in (tmp_path / "profile" / "top_ops.txt").read_text()


def _other_value(s):
    if s.kind is bool:
        return [s.flag if not s.default else "--no-" + s.flag[2:]], not s.default
    if s.name == "compile":
        return [s.flag, "max-autotune"], "max-autotune"
    if s.choices:
        v = next(c for c in s.choices if c != s.default)
        return [s.flag, v], v
    if s.kind is str:
        return [s.flag, "some/path.pt"], "some/path.pt"
    v = s.kind(s.default * 2 + 1) if s.kind is int else s.default / 2 + 0.25
    return [s.flag, str(v)], v


def test_every_setting_has_a_flag_that_reaches_the_settings():
    assert set(BASE) == {s.name for s in SETTINGS}
    argv, want = ["--recipe", "seed-64-scratch"], {}
    for s in SETTINGS:
        flag, v = _other_value(s)
        argv += flag
        want[s.name] = v
    cfg = settings(parser().parse_args(argv))
    assert {k: cfg[k] for k in want} == want


@pytest.mark.parametrize("s", [s for s in SETTINGS if s.kind is float], ids=lambda s: s.name)
@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_number_flags_refuse_nan_and_inf(s, bad, capsys):
    with pytest.raises(SystemExit) as e:
        parser().parse_args([f"{s.flag}={bad}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and s.flag in err[0] and "finite" in err[0]
