"""fasttin.loop and the settings table, in-process on the CPU: the step schedule's logged lr, the
time accounting, the verdict rules, --profile's trace, and one flag per setting."""
import json
import time

import pytest
import torch

from fasttin import checkpoint, loop
from fasttin.checkpoint import CheckpointError
from fasttin.loop import EMA, Budget, StepClock, lr_factor, make_step, shares, train_epoch, verdict
from fasttin.model import build_model
from fasttin.profiling import StepProfiler
from fasttin.recipes import BASE, SETTINGS, SettingError, check_batch, resolve, settings
from fasttin.recipes import train_parser as parser
from fasttin.report import LiveView, metrics_upto, read_metrics, write_metrics


def tiny_step(**over):
    cfg = {**resolve("seed-64-scratch", res=32, batch_size=8, lr=0.01), "amp": "off", **over}
    return make_step(build_model(10, "imagenet"), cfg, device="cpu", steps_per_epoch=3)


def batches(n, wait=0.0):
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        time.sleep(wait)  # a loader that makes the step wait
        yield torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)


def test_logged_lr_is_the_lr_the_epoch_trained_at():
    """StepLR(7): epoch 7 (1-based) trains at 1e-3, epoch 8 at 1e-4; read off the optimizer after each
    epoch's first real step (the step sets the lr it uses)."""
    step = tiny_step(lr=1e-3, step_size=7, gamma=0.1)
    seen = []
    for _epoch in range(9):
        for k, batch in enumerate(batches(3)):
            step(*batch)
            if k == 0:
                seen.append(step.optimizer.param_groups[0]["lr"])
    assert step.steps == 27
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


def test_the_training_phase_outside_the_steps_counts_as_data_wait(monkeypatch):
    """take(spanning=): the epoch's set-up and the logging steps' work (the phase's time outside the
    marks) join the data wait, so the parts add up to the phase; never less than the marks say."""
    now = [10.0]
    monkeypatch.setattr(loop.time, "perf_counter", lambda: now[0])
    clock = StepClock("cpu")
    clock.start()
    for wait, step in ((1.0, 2.0), (0.5, 2.0)):
        now[0] += wait
        clock.data_ready()
        now[0] += step
        clock.step_done()
    clock.collect()
    assert clock.take(spanning=7.0) == {"data_wait_s": 3.0, "compute_s": 4.0}  # 1.5 s outside the steps
    clock.totals = {"data_wait_s": 1.0, "compute_s": 2.0}  # device events may exceed the host's span
    assert clock.take(spanning=2.5) == {"data_wait_s": 1.0, "compute_s": 2.0}


@pytest.mark.parametrize("where", ["model", "ema"])
def test_a_save_refuses_non_finite_weights_the_average_included(where):
    step = tiny_step(ema=0.9)
    step.ensure_finite(0)  # finite: nothing said
    model = step.model if where == "model" else step.ema.model
    model.bn1.running_var[3] = float("inf")  # a buffer counts as much as a parameter
    with pytest.raises(loop.NonFinite, match="non-finite in epoch 4"):
        step.ensure_finite(3)


def test_the_rate_estimate_leaves_the_first_logging_window_out(tmp_path):
    """The first window holds the warm-up (CUDA's start, autotuning, compiling): the estimate comes
    from the steps after it, within its epoch or the next."""
    def said(calls, **kw):
        lines = []
        view = LiveView(True, tmp_path, 100, 10, 4, kw.get("budget", 0), lines.append, kw.get("spent", 0.0))
        for epoch, steps, busy in calls:
            view.start_epoch(epoch)
            view.step(epoch, 0, steps, 1.0, {"data_wait_s": 0.0, "compute_s": busy})
        return lines
    # 25 steps in 30 s of warm-up, then 25 more in 1 s: 250 images a second, 4 s an epoch
    assert said([(0, 25, 30.0), (0, 50, 31.0)]) == [
        "measured 250 img/s after the first 25 step(s) (they took 30.0 s, warm-up included): about 4 s of "
        "training an epoch, 16 s for the 4 epoch(s) left (validation extra)"]
    assert said([(0, 25, 30.0)]) == []  # no rate from the warm-up alone
    # an epoch shorter than the cadence: the next epoch's window, whole, at 500 img/s
    lines = said([(0, 20, 30.0), (1, 20, 0.4), (1, 40, 0.8)], budget=1)
    assert lines == ["measured 500 img/s after the first 20 step(s) (they took 30.0 s, warm-up included): "
                     "about 2 s of training an epoch, the 1-minute budget holds about 30.0 epoch(s) (validation extra)"]
    # a resumed budget run: what is left of the budget, not all of it (it said 30 epochs after 40 s spent)
    lines = said([(0, 20, 30.0), (1, 20, 0.4), (1, 40, 0.8)], budget=1, spent=40.0)
    assert "the 1-minute budget holds about 10.0 epoch(s) more (40 s of it spent before this resume)" in lines[0]


def test_the_rate_after_a_mid_epoch_resume_leaves_the_carried_times_out(tmp_path):
    """The clock's totals start from the stopped part's (StepClock.carry); the rate is this
    process's steps over this process's time, not over both."""
    from fasttin.loop import StepClock
    lines, clock = [], StepClock()
    assert clock.carry({"data_wait_s": 50.0, "compute_s": 150.0, "epoch_s": 210.0}) == 210.0
    view = LiveView(True, tmp_path, 100, 10, 4, 0, lines.append)
    view.start_epoch(0, 60, carried=clock.totals)  # 60 steps done before the stop
    for steps, busy in ((10, 30.0), (20, 31.0)):  # a warm-up window, then 10 steps in 1 s
        view.step(0, 60, steps, 1.0, {"data_wait_s": 50.0, "compute_s": 150.0 + busy})
    assert lines and lines[0].startswith("measured 100 img/s after the first 10 step(s) (they took 30.0 s")
    assert clock.carry(None) == 0.0 and clock.totals == {"data_wait_s": 0.0, "compute_s": 0.0}


def test_train_epoch_without_a_clock_and_max_steps():
    step = tiny_step()
    m, n = train_epoch(step, batches(5), max_steps=3)
    assert n == 3 and m["n"] == 24


@pytest.mark.parametrize("sh, ctx, starts, needle", [
    ({"data_wait": 0.31, "compute": 0.6}, {"backend": "pil", "better_backend":
                                           "the split fits on cuda:0 (1.20 GiB): try --backend resident"},
     "data-bound", "try --backend resident"),
    ({"data_wait": 0.4, "compute": 0.5}, {"backend": "resident"}, "data-bound", "lower --res"),
    ({"data_wait": 0.004, "compute": 0.95}, {"faster": []}, "compute-bound", "0.4%"),
    ({"data_wait": 0.01, "compute": 0.9}, {"faster": ["--amp bf16"]}, "compute-bound", "try --amp bf16"),
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
    prof = StepProfiler(2, tmp_path, torch.device("cpu"), warmup=1, log=lambda *a: None)
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
    if s.check is not None:  # a value with a syntax of its own
        text = {"res_schedule": "48@1,80@3", "eval_res": "96"}[s.name]
        return [s.flag, text], s.parse(text)
    if s.kind is str:
        return [s.flag, "some/path.pt"], "some/path.pt"
    v = s.kind(s.default * 2 + 1) if s.kind is int else s.default / 2 + 0.25
    return [s.flag, str(v)], v


def test_flags_not_given_leave_the_recipe_values():
    """A flag's argparse default must be None, or it would override every recipe's value."""
    for name in ("seed-64-scratch", "fast", "seed-224"):
        cfg = settings(parser().parse_args(["--recipe", name]))
        assert {k: cfg[k] for k in BASE} == {k: v for k, v in resolve(name).items() if k in BASE}


def test_every_setting_has_a_flag_that_reaches_the_settings():
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


@pytest.mark.parametrize("s", [s for s in SETTINGS if s.kind is int], ids=lambda s: s.name)
def test_whole_number_flags_beyond_a_float_are_one_line_before_any_arithmetic(s, capsys):
    """--epochs 10**400 was an OverflowError traceback: every whole-number setting stays below 2**53,
    and the line shows the number cut short."""
    with pytest.raises(SystemExit) as e:
        parser().parse_args([s.flag, "1" + "0" * 400])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and s.flag in err[0] and "401 characters" in err[0]


def test_ema_averages_every_float_tensor_with_a_warmed_up_decay_and_round_trips():
    model = build_model(10, "imagenet")
    ema = EMA(model, decay=0.99, every=2)
    before = {k: v.clone() for k, v in ema.model.state_dict().items()}
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.add_(1.0)
    ema.update()  # the first of every two: nothing folded in yet
    assert all(torch.equal(v, before[k]) for k, v in ema.model.state_dict().items())
    ema.update()
    d = min(0.99, 3 / 12) ** 2  # the second update's warmed-up decay, for two steps
    assert ema.decay_at(2) ** 2 == d
    n = ema.full_decay_step()  # 0.99 applies from update 890 on; before it, the warm-up's decay is smaller
    assert ema.decay_at(n) == 0.99 > ema.decay_at(n - 1) and n == 890
    for k, v in ema.model.state_dict().items():
        if v.is_floating_point():
            assert torch.allclose(v, before[k] * d + (before[k] + 1) * (1 - d)), k
    assert not any(p.requires_grad for p in ema.model.parameters())
    other = EMA(build_model(10, "imagenet"), decay=0.99, every=2)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 2 and all(torch.equal(a, b) for a, b in zip(other.model.state_dict().values(),
                                                                        ema.model.state_dict().values()))
    assert ema.inert_note(889).startswith("--ema 0.99: the warm-up's decay") and "step 890" in ema.inert_note(889)
    assert ema.inert_note(890) is None


def test_a_step_state_missing_an_entry_is_a_checkpoint_error_naming_the_file():
    cfg = resolve("fast-cpu", batch_size=4)  # with an EMA
    step = make_step(build_model(10, cfg["stem"]), cfg, device="cpu", steps_per_epoch=3)
    state = step.state_dict()
    again = make_step(build_model(10, cfg["stem"]), cfg, device="cpu", steps_per_epoch=3)
    again.load_state_dict(state, "run/last.pt")
    assert all(torch.equal(a, b) for a, b in zip(again.model.state_dict().values(), step.model.state_dict().values()))
    for key in ("optimizer", "ema"):
        with pytest.raises(CheckpointError, match=f"run/last.pt has no '{key}' entry"):
            again.load_state_dict({k: v for k, v in state.items() if k != key}, "run/last.pt")


def test_check_batch_needs_a_batch_that_splits_over_the_processes_and_fits_the_split():
    cfg = resolve("seed-64-scratch", batch_size=100)
    check_batch(cfg, 4, 100, "d")
    with pytest.raises(SettingError, match="--batch-size 100 does not split over 3 processes"):
        check_batch(cfg, 3, 1000, "d")
    with pytest.raises(SettingError, match="--batch-size 100: more than the 99 training images of d"):
        check_batch(cfg, 1, 99, "d")


def test_a_resumed_run_keeps_only_the_metric_rows_its_checkpoint_saw(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"epoch": e} for e in (1, 2, 3)]
    write_metrics(path, rows)
    assert metrics_upto(path, 2, 3, rewrite=False) == rows[:2] and read_metrics(path) == rows  # only rank 0 writes
    assert metrics_upto(path, None, 1, rewrite=True) == rows[:1] == read_metrics(path)  # an earlier fasttin's: by epoch
    assert metrics_upto(tmp_path / "none.jsonl", 0, 0, rewrite=True) == []


def test_step_with_ema_updates_it_each_step_and_keeps_it_in_its_state():
    step = tiny_step(ema=0.9)
    train_epoch(step, batches(5))
    assert step.ema.updates == step.steps == 5
    state = step.state_dict()
    again = tiny_step(ema=0.9)
    again.load_state_dict(state)
    assert again.steps == 5 and again.ema.updates == 5
    raw, avg = step.model.state_dict(), step.ema.model.state_dict()
    assert any(not torch.equal(raw[k], avg[k]) for k in raw if raw[k].is_floating_point())


def test_schedules_linear_to_zero():
    lin = lr_factor(resolve("seed-64-scratch", schedule="linear", warmup_epochs=1, epochs=5), steps_per_epoch=10)
    assert lin(0) == pytest.approx(0.1) and lin(9) == pytest.approx(1.0) and lin(10) == pytest.approx(1.0)
    assert lin(30) == pytest.approx(0.5) and lin(49) == pytest.approx(1 / 40) and lin(50) == 0.0
    assert all(lin(s) > lin(s + 1) for s in range(10, 50))


def test_budget_position_follows_the_clock_and_keeps_the_reserve(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(loop.time, "perf_counter", lambda: now[0])
    b = Budget(1.0, total_steps=200, spent=6.0)  # 60 s, 6 already spent before a resume
    assert b.spent() == 6.0 and b.position() == pytest.approx(20.0)
    b.reserve = 10.0  # the final validation and checkpoint: the last step comes at 50 s
    now[0] += 19.0
    assert b.fraction() == pytest.approx(0.5) and b.position() == pytest.approx(100.0) and not b.exhausted()
    now[0] += 25.0
    assert b.exhausted() and b.position() == 200 and b.local_spent() == pytest.approx(50.0)


def test_the_budget_decides_its_end_once_and_a_resume_from_its_figures_decides_the_same(monkeypatch):
    """The end is decided after validation, before the save, and last.pt and the row keep the
    figures it was decided by (last stop's CI flake: last.pt kept the clock at its save, the end
    came later, and a resume from it trained again)."""
    now = [100.0]
    monkeypatch.setattr(loop.time, "perf_counter", lambda: now[0])
    b = Budget(1.0, total_steps=200)  # 60 s
    now[0] += 30.0  # epoch 1: 20 steps in 25 s, validated in 5
    first = {"data_wait_s": 1.0, "compute_s": 24.0, "eval_s": 5.0}
    assert not b.close_epoch(first, steps=20)  # room kept: 1.25 x 5 s + a step of 1.25 s; no save timed yet
    assert (first["budget_spent_s"], first["budget_reserve_s"]) == (30.0, 7.5)
    now[0] += 3.0
    b.saved(3.0)  # the save's time joins the reserve: 1.25 x (5 + 3) + 1.25
    assert b.reserve == 11.25 and b.fraction() == pytest.approx(33 / 48.75)
    now[0] += 20.0  # epoch 2: 12 steps to 48 s (the last step comes at 48.75), validated in 5
    second = {"data_wait_s": 1.0, "compute_s": 14.0, "eval_s": 5.0}
    assert b.close_epoch(second, steps=12)  # 53 s, and the save that follows: 56 s, past 48.75
    assert second["budget_spent_s"] == 56.0
    saved = checkpoint.Position(epoch=1, batch=12, budget_spent_s=second["budget_spent_s"],
                                budget_reserve_s=second["budget_reserve_s"])
    resumed = Budget.resumed(1.0, 200, saved)
    assert resumed.exhausted() and resumed.reserve == b.reserve == 11.25


def test_a_budget_run_over_says_why(monkeypatch):
    """Over budget only when the budget ended in the first epoch (nothing timed, nothing kept) or the
    machine slowed after the last decision: the line names the reserve the last steps ran with."""
    now = [0.0]
    monkeypatch.setattr(loop.time, "perf_counter", lambda: now[0])
    first = Budget(1.0, total_steps=200)
    now[0] += 61.0  # the first epoch outlasts the budget: its steps ran with no reserve
    assert first.close_epoch({"data_wait_s": 0.0, "compute_s": 55.0, "eval_s": 5.0}, steps=20)
    assert "in the first epoch" in first.overrun_note(64.0) and first.overrun_note(60.0) is None
    now[0] = 0.0
    b = Budget(1.0, total_steps=200)
    now[0] = 30.0
    assert not b.close_epoch({"data_wait_s": 1.0, "compute_s": 24.0, "eval_s": 5.0}, steps=20)  # keeps 7.5 s
    now[0] = 55.0
    assert b.close_epoch({"data_wait_s": 0.0, "compute_s": 10.0, "eval_s": 15.0}, steps=2)  # a slow validation
    assert b.reserve > 7.5 and b.overrun_note(63.0).endswith("took longer than the 7.5 s kept for them")
    resumed = Budget(1.0, total_steps=200, spent=62.0, reserve=9.0)  # its last epoch closed in another process:
    assert resumed.overrun_note(62.0) == "the budget ran over by 2.0 s"  # what the steps ran with is not known


def test_under_torchrun_the_budget_keeps_room_for_the_steps_between_two_readings_of_the_clock():
    b = Budget(1.0, total_steps=200, world=2, sync_every=25)
    b.share_clock = lambda: None  # one process here: the agreement is test_ddp's
    b.close_epoch({"data_wait_s": 0.0, "compute_s": 20.0, "eval_s": 4.0}, steps=20)
    assert b.reserve == 1.25 * 4.0 + 20.0  # an epoch of 20 steps: the clock is read at its end only
    solo = Budget(1.0, total_steps=200, sync_every=25)  # a single process reads it every step
    solo.close_epoch({"data_wait_s": 0.0, "compute_s": 20.0, "eval_s": 4.0}, steps=20)
    assert solo.reserve == 1.25 * 4.0 + 1.0


def test_the_budget_ends_where_the_save_that_follows_leaves_no_room(monkeypatch):
    """Decided before the save, the end counts the save too: else a run went on into an epoch of
    one step and paid a second validation and save past its budget (seen under load)."""
    now = [0.0]
    monkeypatch.setattr(loop.time, "perf_counter", lambda: now[0])
    b = Budget(1.0, total_steps=200)
    b.saved(3.0)  # the longest save so far
    now[0] += 50.0
    row = {"data_wait_s": 0.0, "compute_s": 20.0, "eval_s": 4.0}  # room: 1.25 x (4 + 3) + a 1 s step
    assert b.close_epoch(row, steps=20)  # 50 s spent is short of 60 - 9.75, but not once saved
    assert (row["budget_spent_s"], row["budget_reserve_s"]) == (53.0, 9.75)


def test_evaluation_padded_to_the_batch_gives_the_same_figures_and_one_shape():
    """A compiled net's evaluation pads the last, shorter batch (not counted): the same loss, top-1
    and top-5 as without, and the net sees one batch size."""
    from fasttin.loaders import PAD_LABEL
    from fasttin.loop import evaluate
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                              torch.nn.LazyLinear(7))
    net(torch.zeros(2, 3, 8, 8))
    seen = []
    net.register_forward_pre_hook(lambda m, args: seen.append(len(args[0])))
    labels = torch.randint(0, 7, (23,))
    labels[5] = PAD_LABEL  # a distributed pad inside the split stays uncounted too
    batches = [(torch.randn(n, 3, 8, 8), labels[a:a + n]) for a, n in ((0, 10), (10, 10), (20, 3))]
    plain = evaluate(net, batches, device="cpu", amp="off")
    assert seen == [10, 10, 3]
    seen.clear()
    padded = evaluate(net, batches, device="cpu", amp="off", pad_to=10)
    assert seen == [10, 10, 10]
    assert padded.pop("sums") == pytest.approx(plain.pop("sums")) and padded == pytest.approx(plain)
    assert plain["n"] == 22
