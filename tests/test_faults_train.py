"""Faults against `python -m fasttin.train`: each case asserts the exit code, one line naming the
culprit, no traceback, and that nothing was lost (an earlier run's files byte-identical)."""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
from helpers import CLI_TIMEOUT, ROOT, TORCHRUN, error_line, progress, refused, run_cli, snapshot, wait_for

from fasttin import checkpoint
from fasttin.pack import pack

QUICK = ["--recipe", "seed-64-scratch", "--res", "32", "--batch-size", "50", "--lr", "0.02", "--device", "cpu",
         "--workers", "1", "--log-every", "1"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """10 classes, 50 train images (one batch of 50: one step an epoch), 10 val."""
    out = tmp_path_factory.mktemp("tiny")
    pack(None, out, synthetic=5, classes=10, workers=1, quiet=True)
    return out


@pytest.fixture(scope="module")
def other_tiny(tmp_path_factory):
    """Another data set with the same class count."""
    out = tmp_path_factory.mktemp("other")
    pack(None, out, synthetic=6, classes=10, workers=1, quiet=True)
    return out


@pytest.fixture(scope="module")
def done_run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("done")
    r = train(tiny, out, "--epochs", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def train(data, out, *extra, env=None):
    return run_cli("fasttin.train", "--data", data, "--out", out, *QUICK, "--backend", "resident", *extra, env=env)


@pytest.mark.parametrize("flags, needle", [
    (["--lr", "nan"], "--lr"), (["--lr", "inf"], "--lr"), (["--momentum", "nan"], "--momentum"),
    (["--gamma=-inf"], "--gamma"), (["--res", "8"], "--res"), (["--device", "tpu"], "--device"),
    (["--schedule", "poly"], "--schedule"), (["--res-schedule", "48@0"], "--res-schedule"), (["--ema", "1"], "--ema"),
    (["--budget", "-1"], "--budget"), (["--eval-res", "8"], "--eval-res"), (["--batch-size", "500"], "--batch-size"),
    (["--lr", "1e300"], "--lr"), (["--gamma", "1e300", "--step-size", "1", "--epochs", "2"], "--gamma"),
    # each reached torch before: the first step, torch.manual_seed or the allocator raised a traceback
    (["--compile", "bogus"], "--compile"), (["--weight-decay", "1e300"], "--weight-decay"),
    (["--seed", str(2**64)], "--seed"), (["--res", "99999"], "--res"), (["--eval-res", "99999"], "--eval-res"),
    (["--res-schedule", "4000@2"], "--res-schedule"),
])
def test_bad_flags(tiny, tmp_path, flags, needle):
    r = train(tiny, tmp_path / "run", *flags)
    refused(r, 2, needle, alone=False)
    assert not (tmp_path / "run" / "config.json").exists()


def test_missing_data(tmp_path):
    r = train(tmp_path / "nowhere", tmp_path / "run")
    refused(r, 2, str(tmp_path / "nowhere"), alone=False)


def test_unwritable_out(tiny, tmp_path):
    (tmp_path / "file").write_text("x")
    r = train(tiny, tmp_path / "file" / "run")
    refused(r, 2, str(tmp_path / "file"), alone=False)
    assert (tmp_path / "file").read_text() == "x"


@pytest.mark.parametrize("flags, needle", [
    ([], "--resume"),  # an existing run folder, no flag: the three ways out named
    (["--resume", "--res", "48"], "--res"), (["--resume", "--batch-size", "25"], "--batch-size"),
    (["--resume", "--lr", "0.05"], "--lr"), (["--resume", "DATA"], "--data"),
])
@pytest.mark.slow
def test_existing_run_is_never_changed(tiny, other_tiny, done_run, flags, needle):
    before = snapshot(done_run)
    data = other_tiny if "DATA" in flags else tiny
    r = train(data, done_run, "--epochs", "1", *[f for f in flags if f != "DATA"])
    refused(r, 2, needle, alone=False)
    assert snapshot(done_run) == before


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_shard_damaged_in_its_payload_is_refused_before_training(tmp_path, split):
    """64 bytes in the middle of a shard's payload (header and index intact): the sizes match, only
    the hash can tell. The trainer must refuse in one line naming the shard, and write no run."""
    data = tmp_path / "data"
    pack(None, data, synthetic=20, classes=3, workers=1, quiet=True)
    shard = data / f"{split}-000.shard"
    raw = bytearray(shard.read_bytes())
    middle = len(raw) // 3  # inside the payloads: past the 64-byte header, before the index
    raw[middle:middle + 64] = bytes(64 - i for i in range(64))
    shard.write_bytes(bytes(raw))
    r = train(data, tmp_path / "run", "--epochs", "1", "--batch-size", "20")
    refused(r, 2, f"{split}-000.shard", "sha256", alone=False)
    assert not (tmp_path / "run" / "last.pt").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_resume_of_a_finished_run_exits_0(tiny, done_run):
    before = snapshot(done_run)
    r = train(tiny, done_run, "--epochs", "1", "--auto-resume")
    assert r.returncode == 0 and "are done" in r.stderr and "Traceback" not in r.stderr
    assert snapshot(done_run) == before


def test_a_resume_without_epochs_keeps_the_runs_own_target(tiny, done_run):
    """--auto-resume of a finished 1-epoch run, --epochs omitted: it is done (it was extended to the
    recipe's 15 epochs and trained on)."""
    before = snapshot(done_run)
    r = train(tiny, done_run, "--auto-resume")
    assert r.returncode == 0 and "are done" in r.stderr and "new target" not in r.stderr, r.stderr[-2000:]
    assert snapshot(done_run) == before


def test_a_resume_from_a_checkpoint_missing_an_entry_is_one_line_and_changes_nothing(tiny, done_run, tmp_path):
    """A last.pt without its optimizer state (damaged, or written by other settings): refused in one
    line naming the file and the entry, exit 2, every file of the run byte-identical."""
    run = tmp_path / "run"
    shutil.copytree(done_run, run)
    state = checkpoint.load(run / "last.pt")
    del state["optimizer"]
    checkpoint.save(run / "last.pt", state)
    before = snapshot(run)
    r = train(tiny, run, "--epochs", "2", "--resume")
    refused(r, 2, str(run / "last.pt"), "'optimizer'", alone=False)
    assert snapshot(run) == before


@pytest.mark.slow
def test_nonfinite_weights_at_epoch_end_are_never_saved(tiny, tmp_path):
    """Epoch 2 trains at lr 2e38 with a weight decay of 1000: its one step makes the weights inf
    while its loss was finite. Epoch 1's checkpoint stays, and only then is it called intact."""
    r = train(tiny, tmp_path, "--epochs", "2", "--step-size", "1", "--gamma", "1e40", "--weight-decay", "1000")
    last = refused(r, 3, "weights", alone=False)
    assert "is intact" in last
    ck = checkpoint.load(tmp_path / "last.pt")
    assert ck["epoch"] == 1 and checkpoint.load(tmp_path / "best.pt")["epoch"] == 1
    rows = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in rows] == [1]


@pytest.mark.slow
def test_nonfinite_from_the_start_claims_no_checkpoint(tiny, tmp_path):
    r = train(tiny, tmp_path, "--epochs", "2", "--lr", "1e38", "--weight-decay", "1000")
    last = refused(r, 3, "non-finite", alone=False)
    assert "no checkpoint was saved" in last and not (tmp_path / "last.pt").exists()


@pytest.mark.slow
def test_group_sigterm_with_pil_workers_saves_and_resumes(tiny, tmp_path):
    """SIGTERM to the whole process group (timeout, Slurm, Ctrl-C): the pil workers get it too."""
    proc = subprocess.Popen([sys.executable, "-m", "fasttin.train", "--data", str(tiny), "--out", str(tmp_path),
                             *QUICK, "--backend", "pil", "--batch-size", "10", "--epochs", "2"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for(lambda: progress(tmp_path).get("step", 0) >= 2, proc, what="the second step")
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "SIGTERM: saved" in err.strip().splitlines()[-1], err[-3000:]
    assert checkpoint.load(tmp_path / "last.pt")["step"] >= 2
    r = run_cli("fasttin.train", "--data", tiny, "--out", tmp_path, *QUICK, "--backend", "pil", "--batch-size", "10",
                "--epochs", "2", "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert [json.loads(x)["epoch"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def saved_epochs(out) -> int:
    """The epochs last.pt in `out` records as done; 0 before the first is written."""
    try:
        return checkpoint.load(out / "last.pt")["epoch"]
    except checkpoint.CheckpointError:
        return 0


@pytest.mark.slow
def test_elastic_restart_after_sigkill_keeps_every_epoch_once(tiny, tmp_path):
    """torchrun --max-restarts=1 with --auto-resume: SIGKILL rank 0 in epoch 2; the group restarts
    from last.pt and metrics.jsonl ends with every epoch exactly once."""
    proc = subprocess.Popen([*TORCHRUN, "--nproc_per_node=2", "--max-restarts=1", "-m", "fasttin.train", "--data",
                             str(tiny), "--out", str(tmp_path), *QUICK, "--backend", "resident", "--batch-size", "20",
                             "--epochs", "3", "--auto-resume"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for(lambda: progress(tmp_path).get("epoch", 0) >= 2 and saved_epochs(tmp_path) >= 1, proc,
                 what="a step of epoch 2, with epoch 1's last.pt written (in the background)")
        victim = progress(tmp_path)["pid"]
        os.kill(victim, signal.SIGKILL)
        _, err = proc.communicate(timeout=CLI_TIMEOUT)
    finally:  # a failed test must not leave a torchrun group behind on a shared machine
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err[-3000:]
    assert "resumed from" in err
    rows = [json.loads(x)["epoch"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 3]


def train_with(fault: str, data, out, *extra):
    """fasttin.train with `fault` (Python, run first with `loop` and `train` imported) standing in
    for a crash or a signal at one point of the run."""
    code = f"import os, signal, sys\nfrom fasttin import loop, train\n{fault}\nsys.exit(train.main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, "--data", str(data), "--out", str(out), *QUICK, "--backend",
                           "resident", *map(str, extra)], capture_output=True, text=True, timeout=CLI_TIMEOUT, cwd=ROOT)


BUDGET_RUN = ["--epochs", "100", "--budget", "0.1", "--schedule", "linear"]
DIES_AFTER_THE_LAST_SAVE = """
close, saved = loop.Budget.close_epoch, loop.Budget.saved
def close_epoch(self, row, steps):
    self.ended = close(self, row, steps)
    return self.ended
def saved_then_killed(self, seconds):
    saved(self, seconds)
    if self.ended:
        os._exit(137)  # after last.pt, before the metrics row gets its save's time
loop.Budget.close_epoch, loop.Budget.saved = close_epoch, saved_then_killed
"""


@pytest.mark.slow
def test_a_budget_run_killed_after_its_last_save_resumes_spent_and_writes_its_summary(tiny, tmp_path):
    r = train_with(DIES_AFTER_THE_LAST_SAVE, tiny, tmp_path, *BUDGET_RUN)
    assert r.returncode == 137 and not (tmp_path / "summary.json").exists(), r.stderr[-2000:]
    rows = (tmp_path / "metrics.jsonl").read_text()
    again = train(tiny, tmp_path, *BUDGET_RUN, "--resume")
    assert again.returncode == 0 and "budget is spent" in again.stderr, again.stderr[-2000:]
    assert "Traceback" not in again.stderr and (tmp_path / "metrics.jsonl").read_text() == rows
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["epochs"] == len(rows.splitlines()) and summary["budget_spent_s"] > 0


TERM_AFTER_THE_LAST_DECISION = """
close = loop.Budget.close_epoch
def close_epoch(self, row, steps):
    ended = close(self, row, steps)
    if ended:
        os.kill(os.getpid(), signal.SIGTERM)  # while the last checkpoint is being written
    return ended
loop.Budget.close_epoch = close_epoch
"""
TERM_AFTER_THE_LAST_SAVE = """
save = train.save_checkpoint
def save_then_term(*args, **kw):
    save(*args, **kw)
    if kw["epoch"] == 2 and kw["batch"] == 0:
        os.kill(os.getpid(), signal.SIGTERM)
train.save_checkpoint = save_then_term
"""


TERM_ON_THE_STEP_THE_BUDGET_ENDS = """
exhausted = loop.Budget.exhausted
def exhausted_then_term(self):
    self.calls = getattr(self, "calls", 0) + 1
    if self.calls == 5:  # after step 5 of 20, not on the machine's timing: the budget ends, a SIGTERM comes
        self.spent_before += self.seconds
        os.kill(os.getpid(), signal.SIGTERM)
    return exhausted(self)
loop.Budget.exhausted = exhausted_then_term
"""


@pytest.mark.slow
@pytest.mark.parametrize("fault, flags, data", [
    (TERM_AFTER_THE_LAST_DECISION, BUDGET_RUN, "tiny"), (TERM_AFTER_THE_LAST_SAVE, ["--epochs", "2"], "tiny"),
    (TERM_ON_THE_STEP_THE_BUDGET_ENDS, BUDGET_RUN, "learnable")], ids=["budget", "epochs", "budget-mid-epoch"])
def test_a_signal_after_the_last_epoch_ends_the_run_complete(request, tmp_path, fault, flags, data):
    """A run whose last step is done is complete: a SIGTERM during its last save, or on the step its
    budget ends (20 steps an epoch), says so, and the summary is written (it said '--resume
    continues', and --resume trained nothing and wrote no summary)."""
    data = request.getfixturevalue(data)
    r = train_with(fault, data, tmp_path, *flags)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "SIGTERM after the last epoch: the run is complete" in r.stderr and "--resume continues" not in r.stderr
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert json.loads((tmp_path / "summary.json").read_text())["epochs"] == len(rows)
    assert [x["epoch"] for x in rows] == list(range(1, len(rows) + 1))
    if fault is TERM_ON_THE_STEP_THE_BUDGET_ENDS:
        assert rows[-1]["batches"] == 5 and len(rows) == 1
    if "--budget" in flags:
        again = train(data, tmp_path, *flags, "--resume")
        assert again.returncode == 0 and "budget is spent" in again.stderr, again.stderr[-2000:]


KILLED_AFTER_THE_SAVE_OF_EPOCH_2 = """
save = train.save_checkpoint
def save_then_killed(run, step, data, pos, saver, **kw):
    save(run, step, data, pos, saver, **kw)
    if kw["epoch"] == 2 and kw["batch"] == 0:
        saver.wait()  # the background write done: killed after the save
        os._exit(137)
train.save_checkpoint = save_then_killed
"""


@pytest.mark.slow
def test_an_extended_run_leaves_no_stale_summary_and_notes_a_new_target_only_when_it_trains(tiny, tmp_path):
    """--epochs extended: the finished run's summary is not left to contradict the rows (a kill after
    the extension's last save kept the 1-epoch summary for good), and "the new target is recorded"
    is said only when training goes on (a lowered --epochs said it, and config.json kept the old)."""
    assert train(tiny, tmp_path, "--epochs", "1").returncode == 0
    r = train_with(KILLED_AFTER_THE_SAVE_OF_EPOCH_2, tiny, tmp_path, "--epochs", "2", "--resume")
    assert r.returncode == 137 and not (tmp_path / "summary.json").exists(), r.stderr[-2000:]
    again = train(tiny, tmp_path, "--epochs", "2", "--resume")
    assert again.returncode == 0 and "all 2 epoch(s)" in again.stderr, again.stderr[-2000:]
    assert json.loads((tmp_path / "summary.json").read_text())["epochs"] == 2
    before = snapshot(tmp_path)
    lowered = train(tiny, tmp_path, "--epochs", "1", "--resume")
    assert lowered.returncode == 0 and "nothing to train" in lowered.stderr and "new target" not in lowered.stderr
    assert snapshot(tmp_path) == before


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["torn-line", "not-utf8", "emptied", "deleted", "a-folder"])
def test_a_damaged_or_lost_metrics_file_is_refused_on_resume(tiny, done_run, tmp_path, damage):
    """One line naming metrics.jsonl, exit 2, the run untouched (a damaged line was a traceback; a
    lost file resumed silently and its summary left the earlier epochs out)."""
    run = tmp_path / "run"
    shutil.copytree(done_run, run)
    metrics = run / "metrics.jsonl"
    if damage == "torn-line":
        metrics.write_text(metrics.read_text() + '{"epoch": 2, "lr": 0.0\n')
    elif damage == "not-utf8":
        metrics.write_bytes(metrics.read_bytes() + b"\xff\xfe\n")
    elif damage == "emptied":
        metrics.write_text("")
    elif damage == "a-folder":  # it said "0 row(s)... the metrics were lost", the wrong culprit
        metrics.unlink()
        metrics.mkdir()
    else:
        metrics.unlink()
    before = snapshot(run)
    last = refused(train(tiny, run, "--epochs", "2", "--resume"), 2, "metrics.jsonl", alone=False)
    assert ("not a file" in last) == (damage == "a-folder"), last
    assert snapshot(run) == before


@pytest.mark.slow
def test_a_fresh_run_with_an_absurd_budget_takes_a_step_and_says_it_ran_over(tiny, tmp_path):
    """--budget 1e-9 trained nothing and left a folder that neither a new run nor --resume took."""
    r = train(tiny, tmp_path, "--epochs", "5", "--budget", "1e-9")
    assert r.returncode == 0 and "it ended in the first epoch" in r.stderr, r.stderr[-2000:]
    rows = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 1 and json.loads((tmp_path / "summary.json").read_text())["epochs"] == 1
    assert (tmp_path / "last.pt").is_file() and (tmp_path / "best.pt").is_file()


def test_a_log_reader_that_goes_away_costs_the_run_nothing(tiny, tmp_path):
    """`fasttin.train ... 2>&1 | head -2`: the pipe closes after the first lines; the run goes on to
    its end (a BrokenPipeError killed it at its next log line, exit 1, with no checkpoint)."""
    proc = subprocess.Popen([sys.executable, "-m", "fasttin.train", "--data", str(tiny), "--out", str(tmp_path),
                             *QUICK, "--backend", "resident", "--epochs", "2"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.stderr.readline()  # the first log line, then the reader is gone
    proc.stderr.close()
    assert proc.wait(timeout=CLI_TIMEOUT) == 0
    assert json.loads((tmp_path / "summary.json").read_text())["epochs"] == 2
    assert checkpoint.load(tmp_path / "last.pt")["epoch"] == 2


def test_a_backend_that_cannot_run_here_is_one_line_naming_the_alternatives(tiny, tmp_path):
    """--backend dali where DALI does not import (hidden, as on the bare GPU machine): one line with
    the reason and the backends that can run, no traceback, no run folder files."""
    hide = str(ROOT / "tools" / "hide-dali")
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [hide, os.environ.get("PYTHONPATH")]))}
    r = run_cli("fasttin.train", "--data", tiny, "--out", tmp_path / "run", "--recipe", "seed-64-scratch", "--res",
                "32", "--epochs", "1", "--batch-size", "10", "--device", "cpu", "--backend", "dali", env=env)
    line = error_line(r.stderr, "backend='dali' cannot run here", "backend='resident' or 'pil'", alone=False)
    assert r.returncode != 0 and "not importable" in line and "Traceback" not in r.stderr
    assert not (tmp_path / "run" / "last.pt").exists()
