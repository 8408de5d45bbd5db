"""fasttin.train, eval and predict on the CPU: learning, resume, DDP, pretrained mapping, errors."""
import json
import signal
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, TORCHRUN, progress, run_cli, wait_for
from PIL import Image
from torchvision.models import resnet18, resnet34

from fasttin import checkpoint, tuning
from fasttin.model import PretrainedError, build_model, load_pretrained, read_state_dict
from fasttin.pack import pack
from fasttin.recipes import RECIPES, SETTINGS, resolve, settings
from fasttin.recipes import train_parser as parser

QUICK = ["--recipe", "seed-64-scratch", "--res", "32", "--batch-size", "50", "--lr", "0.02", "--device", "cpu",
         "--backend", "resident", "--workers", "1"]


def train(data, out, *extra, timeout=300):
    return run_cli("fasttin.train", "--data", data, "--out", out, *QUICK, *extra, timeout=timeout)


@pytest.mark.slow
def test_learns_a_synthetic_set_quickly(learnable, tmp_path):
    """Learning, the step schedule's logged lr, the time accounting in every row and the summary,
    the verdict, --profile's files and config.json holding every setting actually used."""
    r = train(learnable, tmp_path, "--epochs", "6", "--step-size", "3", "--gamma", "0.5", "--momentum", "0.8",
              "--profile", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["best_val_acc1"] > 0.9 and s["verdict"].split(":")[0].endswith(("-bound", "-heavy"))
    assert "verdict: " + s["verdict"].split(":")[0] in r.stderr
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["lr"] for r in rows] == pytest.approx([0.02] * 3 + [0.01] * 3)  # the lr each epoch trained at
    keys = ("data_wait", "compute", "eval", "checkpoint")
    for row in rows:
        assert set(row) >= {"epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc1", "val_acc5",
                            "epoch_s", "train_img_s", *(k + "_s" for k in keys), *(k + "_share" for k in keys)}
        assert sum(row[k + "_share"] for k in keys) == pytest.approx(1.0, abs=1e-6)  # every part of the epoch
    assert sum(s[k + "_share"] for k in keys) == pytest.approx(1.0, abs=1e-6)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["res"] == 32 and cfg["recipe"] == "seed-64-scratch" and "torch" in cfg["environment"]
    used = resolve("seed-64-scratch", res=32, batch_size=50, lr=0.02, backend="resident", epochs=6,
                   step_size=3, gamma=0.5, momentum=0.8)
    assert (used["amp"], used["channels_last"]) == ("auto", None)  # left to the machine: recorded as chosen
    used.update(tuning.choose("auto", None, "cpu").values)  # as the run chose (a probe, where one runs, cached)
    assert {s.name: cfg[s.name] for s in SETTINGS} == {s.name: used[s.name] for s in SETTINGS}
    assert set(cfg["chosen"]) >= {"amp", "channels_last", "threads"}
    assert len(cfg["classes"]) == 10 and cfg["profile"] == 2
    assert "measured" in r.stderr and "img/s" in r.stderr
    assert "GPU workload" not in r.stderr  # a CPU-sized run is not told to go elsewhere
    for f in ("last.pt", "best.pt", "curves.png", "profile/trace.json", "profile/top_ops.txt"):
        assert (tmp_path / f).stat().st_size > 0
    assert json.loads((tmp_path / "profile" / "trace.json").read_text())["traceEvents"]


def weights(path):
    return checkpoint.load(path)["model"]


def same_weights(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference_run(learnable, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    r = train(learnable, out, "--epochs", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def popen_train(data, out, *extra):
    return subprocess.Popen([sys.executable, "-m", "fasttin.train", "--data", str(data), "--out", str(out),
                             *QUICK, *extra], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(learnable, reference_run, tmp_path):
    proc = popen_train(learnable, tmp_path, "--epochs", "2", "--log-every", "5")  # 20 steps an epoch
    metrics = tmp_path / "metrics.jsonl"
    wait_for(lambda: progress(tmp_path).get("epoch", 0) >= 2, proc, what="a logging step of epoch 2")
    proc.kill()
    proc.wait()
    assert checkpoint.load(tmp_path / "last.pt")["epoch"] == 1, "killed too late: the test is void"
    r = train(learnable, tmp_path, "--epochs", "2", "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(x)["epoch"] for x in metrics.read_text().splitlines()]
    assert rows == [1, 2]  # no epoch repeated or skipped
    assert same_weights(weights(tmp_path / "last.pt"), weights(reference_run / "last.pt"))


# fasttin.train whose epoch-2 last.pt is held half-written in the background saver's thread, a
# marker file saying so: the kill -9 lands mid-write, at a known moment.
HELD_SAVE = """
import sys, threading
from pathlib import Path
from fasttin import checkpoint, fileio, train
real = checkpoint.save
def held(path, state):
    if path.name != "last.pt" or state["epoch"] != 2:
        return real(path, state)
    assert threading.current_thread().name == "fasttin-checkpoint"
    def half(tmp):
        Path(tmp).write_bytes(b"PK" * 1000)
        (path.parent / "held").touch()
        threading.Event().wait()
    fileio.write_with(path, half)
checkpoint.save = held
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sigkill_during_a_background_checkpoint_write_keeps_the_last_one_and_resumes_exactly(
        learnable, reference_run, tmp_path):
    """The checkpoint is written by a background thread while training goes on: a kill -9 in the
    middle of its write leaves the previous last.pt whole, and the resume from it is exact."""
    proc = subprocess.Popen([sys.executable, "-c", HELD_SAVE, "--data", str(learnable), "--out", str(tmp_path),
                             *QUICK, "--epochs", "2"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    wait_for(lambda: (tmp_path / "held").exists(), proc, what="the held write of epoch 2's last.pt")
    assert list(tmp_path.glob("last.pt.tmp*")), "the write is not in flight: the test is void"
    proc.kill()
    proc.wait()
    assert checkpoint.load(tmp_path / "last.pt")["epoch"] == 1
    r = train(learnable, tmp_path, "--epochs", "2", "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert [json.loads(x)["epoch"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert same_weights(weights(tmp_path / "last.pt"), weights(reference_run / "last.pt"))
    assert not list(tmp_path.glob("*.tmp*"))


@pytest.mark.slow
def test_sigterm_saves_mid_epoch_and_resume_matches(learnable, reference_run, tmp_path):
    proc = popen_train(learnable, tmp_path, "--epochs", "2", "--log-every", "1")
    wait_for(lambda: progress(tmp_path).get("step", 0) >= 2, proc, what="the second step")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "SIGTERM" in err and "Traceback" not in err
    ck = checkpoint.load(tmp_path / "last.pt")
    assert (ck["epoch"], ck["step"]) != (2, 0)
    r = train(learnable, tmp_path, "--epochs", "2", "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert same_weights(weights(tmp_path / "last.pt"), weights(reference_run / "last.pt"))


@pytest.mark.slow
def test_ddp_two_processes_gloo(packed, tmp_path):
    r = subprocess.run([*TORCHRUN, "--nproc_per_node=2", "-m", "fasttin.train", "--data", str(packed), "--out",
                        str(tmp_path), *QUICK, "--epochs", "2", "--batch-size", "20"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["world_size"] == 2
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in rows] == [1, 2] and all(0 <= x["val_acc1"] <= 1 for x in rows)
    assert r.stderr.count("epoch 2: train loss") == 1  # rank 0 reports, rank 1 stays quiet


def test_pretrained_mapping_for_every_stem_and_class_count(tmp_path):
    tv = resnet18(num_classes=1000).state_dict()
    for stem, classes, expect in [("imagenet", 200, ["fc.bias", "fc.weight"]),
                                  ("cifar", 200, ["conv1.weight", "fc.bias", "fc.weight"]),
                                  ("imagenet", 1000, []), ("cifar", 1000, ["conv1.weight"])]:
        model = build_model(classes, stem)
        before = model.state_dict()["fc.weight"].clone()
        fresh = load_pretrained(model, tv)
        assert fresh == expect, (stem, classes)
        assert torch.equal(model.state_dict()["layer3.1.conv2.weight"], tv["layer3.1.conv2.weight"])
        assert torch.equal(model.state_dict()["bn1.running_var"], tv["bn1.running_var"])
        if "fc.weight" in fresh:
            assert torch.equal(model.state_dict()["fc.weight"], before)
    # a fasttin checkpoint, wrapped by DDP and compile, is read too
    src = build_model(200, "cifar")
    wrapped = {f"module._orig_mod.{k}": v for k, v in src.state_dict().items()}
    torch.save({"model": wrapped, "epoch": 3}, tmp_path / "ck.pt")
    model = build_model(200, "imagenet")
    assert load_pretrained(model, read_state_dict(tmp_path / "ck.pt")) == ["conv1.weight"]
    with pytest.raises(PretrainedError, match="not a ResNet18"):
        load_pretrained(build_model(200), resnet34().state_dict())
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(PretrainedError, match="not a torch checkpoint"):
        read_state_dict(tmp_path / "junk.pt")


def test_every_recipe_is_a_set_of_valid_settings():
    """Each recipe's value would pass its own flag (a recipe cannot hold what a user may not type),
    and resolving applies it."""
    by_name = {s.name: s for s in SETTINGS}
    for name, values in RECIPES.items():
        cfg = resolve(name)
        assert cfg["recipe"] == name
        for k, v in values.items():
            assert cfg[k] == v and (v is None or by_name[k].kind is bool or by_name[k].parse(str(v)) == v), (name, k)
    assert resolve("seed-224")["res"] == 224 and resolve("seed-224")["pretrained"] == "imagenet"
    assert resolve("seed-finetune")["stem"] == "cifar"
    fast = resolve("fast")
    assert fast["batch_size"] >= 512 and fast["nesterov"] and fast["label_smoothing"] == 0.1
    assert settings(parser().parse_args(["--res", "224"]))["recipe"] == "seed-224"
    assert settings(parser().parse_args([]))["recipe"] == "seed-224"
    cfg = settings(parser().parse_args(["--recipe", "fast", "--lr", "0.1", "--no-channels-last", "--compile"]))
    assert cfg["lr"] == 0.1 and cfg["channels_last"] is False and cfg["compile"] == "default"


def test_pretrained_imagenet_offline_is_one_line(packed, tmp_path):
    r = train(packed, tmp_path, "--pretrained", "imagenet", "--epochs", "1")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert "--pretrained none" in last and "--pretrained PATH" in last


@pytest.mark.slow
def test_recipe_imagenet_weights_offline_train_from_scratch(packed, tmp_path):
    """The recipe (no --pretrained flag) asks for ImageNet weights that cannot be had: one line,
    then from scratch, recorded with the reason in config.json and summary.json."""
    r = run_cli("fasttin.train", "--data", packed, "--out", tmp_path, "--recipe", "seed-64-pretrained",
                *QUICK[2:], "--epochs", "1", env={"TORCH_HOME": str(tmp_path / "torch-home")})
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = json.loads((tmp_path / "config.json").read_text())
    if cfg["pretrained"] == "imagenet":
        pytest.skip("this machine can download the ImageNet weights")
    s = json.loads((tmp_path / "summary.json").read_text())
    assert cfg["pretrained"] == s["pretrained"] == "none" and s["pretrained_reason"] == cfg["pretrained_reason"]
    assert "ImageNet" in cfg["pretrained_reason"] and "trains from scratch" in r.stderr


@pytest.mark.parametrize("flags, needle", [
    (["--res", "-5"], "--res"), (["--lr", "abc"], "--lr"), (["--amp", "fp8"], "--amp"),
    (["--data", "/nonexistent/place"], "/nonexistent/place"), (["--epochs", "0"], "--epochs"),
])
def test_bad_flags_one_line(packed, tmp_path, flags, needle):
    args = ["--data", str(packed), "--out", str(tmp_path), *QUICK, *flags]
    r = run_cli("fasttin.train", *args)
    assert r.returncode != 0 and "Traceback" not in r.stderr and needle in r.stderr


@pytest.mark.slow
def test_eval_and_predict(learnable, reference_run, tmp_path):
    ckpt = reference_run / "best.pt"
    r = run_cli("fasttin.eval", "--ckpt", ckpt, "--data", learnable, "--device", "cpu", "--backend", "pil",
                "--json", tmp_path / "e.json")
    assert r.returncode == 0, r.stderr
    e = json.loads((tmp_path / "e.json").read_text())
    assert e["images"] == 200 and e["top1"] > 0.5 and e["res"] == 32 and e["top5"] >= e["top1"]
    r = run_cli("fasttin.eval", "--ckpt", ckpt, "--data", learnable, "--device", "cpu", "--res", "48",
                "--json", tmp_path / "e48.json")  # the README's "at any resolution"
    assert r.returncode == 0, r.stderr
    e48 = json.loads((tmp_path / "e48.json").read_text())
    assert e48["res"] == 48 and e48["trained_res"] == 32 and e48["images"] == 200 and e48["loss"] != e["loss"]
    # any size and format PIL reads
    Image.new("RGB", (100, 80), (200, 30, 30)).save(tmp_path / "a.png")
    Image.new("L", (64, 64), 128).save(tmp_path / "b.jpg")
    r = run_cli("fasttin.predict", "--ckpt", ckpt, tmp_path / "a.png", tmp_path / "b.jpg", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].count(";") == 4 and "n900000" in lines[0]
    r = run_cli("fasttin.predict", "--ckpt", ckpt, "--split", "test", "--data", learnable, "--csv", tmp_path / "p.csv",
                "--device", "cpu")
    assert r.returncode == 0, r.stderr
    rows = (tmp_path / "p.csv").read_text().splitlines()
    assert rows[0].startswith("file,top1") and len(rows) == 1 + 200
    # a checkpoint of another class count: a clear error
    other = tmp_path / "other"
    pack(None, other, synthetic=5, classes=4, workers=1, quiet=True)
    r = run_cli("fasttin.eval", "--ckpt", ckpt, "--data", other, "--device", "cpu")
    assert r.returncode == 2 and "10 classes" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
@pytest.mark.realdata
def test_real_ten_classes_on_cpu(tin_zip, tmp_path):
    """The real images learn: 10 classes, 2 epochs at 32 px (on a 2-core AVX2 CPU in fp32, one
    thread, alone: 39 s and 45 s an epoch, 31.2% and 36.0% top-1; 64 px and 3 epochs took 283 s in
    the suite there)."""
    pack(tin_zip, tmp_path / "d", classes=10, quiet=True)
    r = run_cli("fasttin.train", "--data", tmp_path / "d", "--out", tmp_path / "run", "--recipe", "seed-64-scratch",
                "--res", "32", "--epochs", "2", "--batch-size", "50", "--lr", "0.02", "--device", "cpu",
                "--backend", "resident")
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["best_val_acc1"] > 0.3  # chance is 0.1


@pytest.mark.slow
def test_the_chain_starts_each_stage_from_the_last_ones_best_weights(learnable, tmp_path):
    """The write-up's chain on the synthetic set: a run from scratch says so and records it; the
    next stage (--pretrained RUN/best.pt, another stem) loads those weights, all but the new stem,
    and its config.json names the checkpoint it started from."""
    first = train(learnable, tmp_path / "one", "--epochs", "1")
    assert first.returncode == 0 and "weights: from scratch (pretrained none)" in first.stderr
    assert json.loads((tmp_path / "one" / "config.json").read_text())["pretrained"] == "none"
    best = tmp_path / "one" / "best.pt"
    second = train(learnable, tmp_path / "two", "--epochs", "1", "--stem", "cifar", "--pretrained", best)
    assert second.returncode == 0, second.stderr[-2000:]
    assert f"weights from {best}; freshly initialised: conv1.weight" in second.stderr
    assert json.loads((tmp_path / "two" / "config.json").read_text())["pretrained"] == str(best)


def test_schedules():
    from fasttin.loop import lr_factor
    step = lr_factor(resolve("seed-64-scratch"), steps_per_epoch=10)
    assert [step(s) for s in (0, 69, 70, 139, 140)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    cos = lr_factor(resolve("fast", epochs=10), steps_per_epoch=10)  # 2 warmup epochs
    assert cos(0) == pytest.approx(0.05) and cos(19) == pytest.approx(1.0)
    assert cos(20) == pytest.approx(1.0) and cos(60) == pytest.approx(0.5) and cos(99) < 0.001
    assert all(cos(s) >= cos(s + 1) for s in range(20, 99))


@pytest.mark.slow
def test_fast_recipe_path_runs(packed, tmp_path):
    """fast's settings (warmup + cosine, nesterov, label smoothing, no decay on norms, crop, flip
    TTA) end to end, small: the imagenet stem keeps it quick on the CPU."""
    r = run_cli("fasttin.train", "--data", packed, "--out", tmp_path, "--recipe", "fast", "--stem", "imagenet",
                "--res", "32", "--epochs", "3", "--batch-size", "50", "--device", "cpu", "--backend", "resident",
                "--workers", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    lrs = [json.loads(x)["lr"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    from fasttin.loop import lr_factor
    factor = lr_factor(resolve("fast", epochs=3), steps_per_epoch=4)  # 200 train images / 50
    assert lrs == pytest.approx([0.4 * factor(e * 4) for e in range(3)])  # each epoch's first step
    assert lrs[0] < lrs[1] < lrs[2]  # two warmup epochs, then the cosine starts at the peak
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["tta"] and cfg["augment"] == "crop" and cfg["label_smoothing"] == 0.1 and cfg["nesterov"]


@pytest.mark.slow
def test_ddp_sigterm_stops_every_rank_at_the_same_step(learnable, tmp_path):
    proc = subprocess.Popen([*TORCHRUN, "--nproc_per_node=2", "-m", "fasttin.train", "--data", str(learnable),
                             "--out", str(tmp_path), *QUICK, "--epochs", "3", "--batch-size", "20", "--log-every", "2"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: progress(tmp_path).get("step", 0) >= 4, proc, what="the second logging step")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)  # a rank left waiting in an all-reduce would hang here
    ck = checkpoint.load(tmp_path / "last.pt")
    assert "SIGTERM" in err and (ck["epoch"], ck["step"]) != (3, 0)
    r = subprocess.run([*TORCHRUN, "--nproc_per_node=2", "-m", "fasttin.train", "--data", str(learnable), "--out",
                        str(tmp_path), *QUICK, "--epochs", "3", "--batch-size", "20", "--resume"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x)["epoch"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 3]


# ---- time-to-accuracy settings: resolution schedule, budget, EMA -----------------------------------

def rows_of(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def summary_of(out):
    return json.loads((out / "summary.json").read_text())


def quick_argv(data, out, *extra):
    return ["--data", str(data), "--out", str(out), *QUICK, *extra]


@pytest.mark.slow
def test_res_schedule_changes_the_batch_shape_exactly_on_the_epochs_it_names(learnable, tmp_path, monkeypatch):
    """In-process, so that the step sees the real batches: 20 steps an epoch (1000 images / 50)."""
    from fasttin import train as train_mod
    from fasttin.loop import TrainStep
    seen, real = [], TrainStep.__call__
    monkeypatch.setattr(TrainStep, "__call__", lambda self, x, y: (seen.append(tuple(x.shape)), real(self, x, y))[1])
    assert train_mod.main(quick_argv(learnable, tmp_path, "--epochs", "4", "--res-schedule", "24@2,40@4")) == 0
    assert seen == [(50, 3, 32, 32)] * 20 + [(50, 3, 24, 24)] * 40 + [(50, 3, 40, 40)] * 20
    rows = rows_of(tmp_path)
    assert [r["res"] for r in rows] == [r["val_res"] for r in rows] == [32, 24, 24, 40]
    assert checkpoint.load(tmp_path / "best.pt")["arch"]["res"] in (24, 32, 40)
    seen.clear()
    assert train_mod.main(quick_argv(learnable, tmp_path / "fixed", "--epochs", "2", "--res-schedule", "48@2",
                                     "--eval-res", "40")) == 0
    assert seen == [(50, 3, 32, 32)] * 20 + [(50, 3, 48, 48)] * 20
    assert [r["val_res"] for r in rows_of(tmp_path / "fixed")] == [40, 40]
    assert checkpoint.load(tmp_path / "fixed" / "last.pt")["arch"]["res"] == 40  # eval and predict use it


@pytest.mark.slow
def test_ema_is_validated_beside_the_raw_weights_and_eval_reads_it_when_it_was_best(learnable, tmp_path,
                                                                                      monkeypatch, capsys):
    """The raw weights are made to look worse, so the EMA's (really measured) accuracy is the best:
    best.pt must then hold the EMA weights, and fasttin.eval must score exactly what training did."""
    from fasttin import train as train_mod
    real = train_mod.validate

    def raw_looks_worse(*a, **k):
        v = real(*a, **k)
        assert "ema_acc1" in v
        return {**v, "acc1": -1.0}
    monkeypatch.setattr(train_mod, "validate", raw_looks_worse)
    assert train_mod.main(quick_argv(learnable, tmp_path, "--epochs", "2", "--ema", "0.9")) == 0
    # 0.9 applies from step 80 on, after these two short epochs: the run says the warm-up's decay ruled
    err = capsys.readouterr().err
    assert "--ema 0.9: the warm-up's decay (1+t)/(10+t) reaches it only at step 80" in err
    rows, s = rows_of(tmp_path), summary_of(tmp_path)
    last, best = checkpoint.load(tmp_path / "last.pt"), checkpoint.load(tmp_path / "best.pt")
    assert not same_weights(last["model"], last["ema"]["model"])  # the average is not the raw weights
    assert best["weights"] == s["best_weights"] == "ema" and s["best_val_acc1"] == max(r["ema_val_acc1"] for r in rows)
    if best["epoch"] == 2:
        assert same_weights(best["model"], last["ema"]["model"])
    r = run_cli("fasttin.eval", "--ckpt", tmp_path / "best.pt", "--data", learnable, "--device", "cpu", "--backend",
                "resident", "--batch-size", "50", "--json", tmp_path / "e.json")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "e.json").read_text())["top1"] == rows[best["epoch"] - 1]["ema_val_acc1"]


def within_budget(budget_s: float, rows: list, summary: dict, stderr: str) -> float:
    """The most a --budget run may spend: its budget, unless the machine slowed after the last
    decision (a loaded CI machine), then by no more than its last step, validation and save took;
    the run says when it ran over."""
    last = rows[-1]
    tail = last["eval_s"] + last["checkpoint_s"] + (last["data_wait_s"] + last["compute_s"]) / last["batches"]
    assert ("the budget ran over by" in stderr) == (summary["budget_spent_s"] > budget_s), stderr[-2000:]
    return budget_s + tail


@pytest.mark.slow
def test_budget_run_stops_within_its_budget_with_a_validation_and_a_checkpoint(learnable, tmp_path):
    budget_s = 30
    r = train(learnable, tmp_path, "--epochs", "200", "--budget", str(budget_s / 60), "--schedule", "linear",
              "--res-schedule", "24@2")
    assert r.returncode == 0, r.stderr[-2000:]
    rows, s = rows_of(tmp_path), summary_of(tmp_path)
    assert s["budget_min"] == budget_s / 60 and 0 < s["budget_spent_s"] <= within_budget(budget_s, rows, s, r.stderr)
    assert 1 < s["epochs_fitted"] < 200 and s["epochs"] == len(rows) and "holds about" in r.stderr
    assert [r["epoch"] for r in rows] == list(range(1, len(rows) + 1)) and rows[-1]["batches"] <= 20
    lrs = [r["lr"] for r in rows]
    assert all(a > b for a, b in zip(lrs, lrs[1:])) and lrs[-1] < 0.5 * lrs[0]  # the schedule ran on the clock
    assert [r["res"] for r in rows[:2]] == [32, 24]  # the resolution follows the clock's epoch too
    last = checkpoint.load(tmp_path / "last.pt")
    assert (last["epoch"], last["step"]) == ((len(rows), 0) if rows[-1]["batches"] == 20 else
                                             (len(rows) - 1, rows[-1]["batches"]))
    assert (tmp_path / "best.pt").is_file() and 0 < last["budget_spent_s"] <= within_budget(budget_s, rows, s, r.stderr)
    again = train(learnable, tmp_path, "--epochs", "200", "--budget", str(budget_s / 60), "--schedule", "linear",
                  "--res-schedule", "24@2", "--resume")
    assert again.returncode == 0 and "budget is spent" in again.stderr and rows_of(tmp_path) == rows


@pytest.mark.slow
def test_a_stopped_budget_run_resumes_with_its_ema_schedule_position_and_spent_budget(learnable, tmp_path):
    flags = ["--epochs", "100", "--budget", "0.6", "--schedule", "linear", "--ema", "0.9", "--res-schedule",
             "24@3", "--log-every", "2"]
    proc = popen_train(learnable, tmp_path, *flags)
    wait_for(lambda: progress(tmp_path).get("epoch", 0) >= 2 and progress(tmp_path).get("step", 0) >= 4, proc,
             what="a logging step in epoch 2")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err
    stopped = checkpoint.load(tmp_path / "last.pt")
    assert stopped["step"] > 0 and 0 < stopped["budget_spent_s"] < 36
    assert stopped["ema"]["updates"] == stopped["steps"] > 20
    r = train(learnable, tmp_path, *flags, "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    rows, s, last = rows_of(tmp_path), summary_of(tmp_path), checkpoint.load(tmp_path / "last.pt")
    assert f"{stopped['budget_spent_s']:.1f} s of the 0.6-minute budget spent" in r.stderr  # not 0.0 minutes
    assert stopped["budget_spent_s"] < s["budget_spent_s"] <= within_budget(36, rows, s, r.stderr)
    assert [x["epoch"] for x in rows] == list(range(1, len(rows) + 1))
    assert rows[stopped["epoch"]]["res"] == stopped["epoch_res"] and rows[stopped["epoch"]]["batches"] == 20
    assert last["ema"]["updates"] == last["steps"] > stopped["steps"]  # the average carried on, never restarted


@pytest.mark.slow
def test_sigterm_mid_epoch_resume_matches_with_ema_and_a_res_schedule(learnable, tmp_path):
    """Epoch-based: the resumed run ends bit-identical to an uninterrupted one, raw weights and EMA."""
    flags = ["--epochs", "3", "--ema", "0.9", "--res-schedule", "24@2,40@3", "--schedule", "linear"]
    ref = tmp_path / "ref"
    assert train(learnable, ref, *flags).returncode == 0
    out = tmp_path / "stopped"
    proc = popen_train(learnable, out, *flags, "--log-every", "1")
    wait_for(lambda: progress(out).get("epoch", 0) >= 2 and progress(out).get("step", 0) >= 3, proc,
             what="step 3 of epoch 2")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 130
    ck = checkpoint.load(out / "last.pt")
    assert ck["step"] > 0 and ck["epoch_res"] == (24 if ck["epoch"] == 1 else 40)
    assert train(learnable, out, *flags, "--resume").returncode == 0
    a, b = checkpoint.load(out / "last.pt"), checkpoint.load(ref / "last.pt")
    assert same_weights(a["model"], b["model"]) and same_weights(a["ema"]["model"], b["ema"]["model"])
    assert [r["res"] for r in rows_of(out)] == [r["res"] for r in rows_of(ref)] == [32, 24, 40]
    # the stopped epoch's row counts the steps before the signal too (it counted the resumed part only)
    stopped, whole = rows_of(out)[ck["epoch"]], rows_of(ref)[ck["epoch"]]
    for key in ("batches", "train_loss", "train_acc"):
        assert stopped[key] == whole[key], key
    assert stopped["epoch_s"] >= ck["partial"]["epoch_s"] > 0 and stopped["compute_s"] > ck["partial"]["compute_s"]
