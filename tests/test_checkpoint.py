"""Checkpoints are data, never code: round trips, restricted loads, atomic saves."""
import errno
import os
import pickle
import random

import numpy as np
import pytest
import torch

from fasttin import checkpoint
from fasttin import model as model_mod
from fasttin.checkpoint import CheckpointError
from fasttin.errors import EXIT_BAD_INPUT, UserError, run_command
from fasttin.fileio import OutputError
from fasttin.model import PretrainedError, build_model, read_state_dict


class Payload:
    """A pickle that would create `marker` when unpickled without restriction."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def draws():
    return (torch.rand(5).tolist(), np.random.rand(5).tolist(), np.random.standard_normal(3).tolist(),
            [random.random() for _ in range(5)], random.gauss(0, 1))


@pytest.mark.parametrize("error", [CheckpointError, PretrainedError, UserError])
def test_a_bad_checkpoint_is_one_line_and_exit_2_but_a_real_out_of_memory_keeps_its_traceback(error, capsys):
    """run_command, every command's wrapper: a user's mistake is one line; a MemoryError (a real
    out-of-memory, not the resident store's "does not fit") is a bug or a machine limit, never
    "bad input": it must propagate with its traceback (it was exit 2, "nothing lost", before)."""
    def fails(exc):
        raise exc
    assert run_command("fasttin.x", lambda: fails(error("last.pt is damaged"))) == EXIT_BAD_INPUT
    assert capsys.readouterr().err == "fasttin.x: error: last.pt is damaged\n"
    with pytest.raises(MemoryError):
        run_command("fasttin.x", lambda: fails(MemoryError("out of memory")))


def test_rng_round_trip_through_a_file_restores_every_stream(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's legacy state
    random.gauss(0, 1)  # and one in Python's
    checkpoint.save(tmp_path / "c.pt", {"rng": checkpoint.rng_state()})
    expected = draws()
    draws()  # move every stream on
    checkpoint.set_rng_state(checkpoint.load(tmp_path / "c.pt")["rng"])
    assert draws() == expected


def test_an_earlier_fasttins_checkpoint_still_loads_and_restores(tmp_path):
    """Those held numpy's and Python's RNG states as their own tuples (an ndarray inside)."""
    np.random.seed(5), random.seed(6)
    torch.save({"rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                        "cuda": None}}, tmp_path / "old.pt")
    expected = draws()
    checkpoint.set_rng_state(checkpoint.load(tmp_path / "old.pt")["rng"])
    assert draws() == expected


def test_save_load_round_trip_of_a_training_state(tmp_path):
    model = build_model(7, "cifar")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "scaler": torch.amp.GradScaler("cpu", enabled=False).state_dict(), "epoch": 2,
             "config": {"lr": 0.1, "out": "runs/x", "nan": None}, "classes": ["n01", "n02"], "words": ["a", "b"],
             "arch": {"name": "resnet18", "stem": "cifar", "num_classes": 7, "res": 16},
             "rng": checkpoint.rng_state()}
    checkpoint.save(tmp_path / "last.pt", state)
    back = checkpoint.load(tmp_path / "last.pt")
    assert back["config"] == state["config"] and back["classes"] == ["n01", "n02"]
    restored = model_mod.restore_model(back, "cpu")
    for k, v in model.state_dict().items():
        assert torch.equal(restored.state_dict()[k], v)
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_save_refuses_objects_a_restricted_load_could_not_read(tmp_path):
    with pytest.raises(TypeError, match=r"state\['config'\]\['when'\] is a numpy"):
        checkpoint.save(tmp_path / "c.pt", {"config": {"when": np.float64(1.0)}})
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("form", ["zip", "legacy-pickle", "numpy-object-array"])
def test_a_hostile_checkpoint_is_refused_and_never_runs(tmp_path, form):
    marker, path = tmp_path / "PWNED", tmp_path / "evil.pt"
    if form == "legacy-pickle":
        path.write_bytes(pickle.dumps(Payload(marker)))
    elif form == "zip":
        torch.save({"model": Payload(marker)}, path)
    else:  # numpy arrays are allowed (old RNG states): their items are still vetted
        inside = np.empty(1, dtype=object)
        inside[0] = Payload(marker)
        torch.save({"rng": {"numpy": inside}}, path)
    for read in (checkpoint.load, read_state_dict):
        with pytest.raises(UserError) as e:
            read(path)
        assert str(path) in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"junk", "cut"], ids=["empty", "junk", "truncated"])
def test_damaged_checkpoint_is_one_line(tmp_path, content):
    path = tmp_path / "c.pt"
    if content == "cut":
        torch.save({"model": build_model(3).state_dict()}, path)
        path.write_bytes(path.read_bytes()[:5000])
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match="not a torch checkpoint, or a damaged one") as e:
        checkpoint.load(path)
    assert "\n" not in str(e.value)


def test_a_state_dict_of_another_model_is_not_a_fasttin_checkpoint(tmp_path):
    from torchvision.models import resnet34
    torch.save(resnet34().state_dict(), tmp_path / "r34.pt")
    with pytest.raises(CheckpointError, match="not a fasttin checkpoint"):
        model_mod.restore_model(checkpoint.load(tmp_path / "r34.pt"), "cpu", where="r34.pt")
    fake = {"arch": {"name": "resnet18", "stem": "imagenet", "num_classes": 1000}, "model": resnet34().state_dict()}
    with pytest.raises(CheckpointError, match="weights are not a resnet18"):
        model_mod.restore_model(fake, "cpu")


def test_a_failed_save_keeps_the_old_checkpoint_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoint.save(path, {"epoch": 1})
    before = path.read_bytes()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OutputError, match=f"cannot write {path}: no space left"):
        checkpoint.save(path, {"epoch": 2})
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


@pytest.mark.parametrize("crash_at", [1, 2])
def test_a_crash_between_the_two_saves_never_leaves_last_pt_ahead_of_best_pt(tmp_path, monkeypatch, crash_at):
    """last.pt commits an epoch: it must never record a best that best.pt does not hold (a resume
    would then report the new best while best.pt keeps the old weights)."""
    from fasttin.loop import make_step
    from fasttin.recipes import resolve
    step = make_step(build_model(3, "cifar"), resolve("seed-64-scratch"), device="cpu", steps_per_epoch=1)
    pos, cfg = checkpoint.Position(best=0.5), resolve("seed-64-scratch", eval_res=0)
    save_run = lambda epoch: checkpoint.save_run(tmp_path, step, pos, cfg, ["a", "b", "c"], ["", "", ""],
                                                 epoch=epoch, batch=0, res=32, best="raw")
    save_run(1)
    pos.best, writes, real_save = 0.7, [], checkpoint.save

    def dies(path, state):
        writes.append(path.name)
        if len(writes) == crash_at:
            raise KeyboardInterrupt  # a kill: nothing after this write happens
        real_save(path, state)
    monkeypatch.setattr(checkpoint, "save", dies)
    with pytest.raises(KeyboardInterrupt):
        save_run(2)
    last, best = checkpoint.load(tmp_path / "last.pt"), checkpoint.load(tmp_path / "best.pt")
    assert last["best_acc1"] <= best["best_acc1"] and last["epoch"] <= best["epoch"], writes


def _flip_in_largest_tensor(path):
    """4 bytes flipped in the middle of the largest tensor's data inside the zip (bit rot)."""
    import struct
    import zipfile
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
        f.seek(info.header_offset + 30 + name_len + extra_len + info.file_size // 2)
        f.write(b"\xff" * 4)
    return info.filename


def test_a_tensor_damaged_inside_the_zip_is_refused_naming_the_member(tmp_path):
    """torch.load checks no CRC: flipped bytes in a weight loaded as NaN (eval exited 0 with
    "loss": NaN). Every read (eval, predict, --resume, --pretrained) now checks the zip's CRCs."""
    path = tmp_path / "best.pt"
    checkpoint.save(path, {"model": build_model(3).state_dict()})
    member = _flip_in_largest_tensor(path)
    for read in (checkpoint.load, read_state_dict):
        with pytest.raises(UserError) as e:
            read(path)
        assert f"{path} is not a torch checkpoint, or a damaged one (its member {member} fails its CRC" in str(e.value)
        assert "\n" not in str(e.value)


def test_a_checkpoint_in_the_old_non_zip_format_still_loads(tmp_path):
    """It has no CRCs to check; it is read as before."""
    torch.save({"epoch": 3, "w": torch.ones(2)}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    assert checkpoint.load(tmp_path / "old.pt")["epoch"] == 3


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_for_pretrained_and_restore(tmp_path, value):
    sd = build_model(3, "cifar").state_dict()
    sd["layer2.0.bn1.running_var"][0] = value
    checkpoint.save(tmp_path / "w.pt", {"model": sd})
    with pytest.raises(PretrainedError, match=r"w\.pt: its weights are not finite \(layer2\.0\.bn1\.running_var"):
        read_state_dict(tmp_path / "w.pt")
    ckpt = {"model": sd, "arch": {"name": "resnet18", "stem": "cifar", "num_classes": 3}}
    with pytest.raises(CheckpointError, match=r"c\.pt: its weights are not finite \(layer2\.0\.bn1\.running_var"):
        model_mod.restore_model(ckpt, "cpu", where="c.pt")


@pytest.mark.parametrize("res", [8, 4096, "64"])
def test_a_checkpoints_resolution_follows_the_one_rule(res):
    with pytest.raises(CheckpointError, match="a resolution is a whole number from 16 to 512"):
        model_mod.trained_res({"arch": {"res": res}}, "c.pt")


def test_the_background_saver_writes_the_state_as_it_was_in_order_and_hands_back_its_error(tmp_path, monkeypatch):
    """The saver snapshots at submit (training may change the tensors at once), writes its files in
    the order given, one submission after another, and a failed write is the caller's error at the
    next submit or wait, with the previous file intact."""
    import threading
    w = torch.zeros(1000)
    order, gate, real = [], threading.Event(), checkpoint.save

    def gated(path, state):
        gate.wait(timeout=60)  # the test decides when the write goes ahead
        order.append(path.name)
        real(path, state)
    monkeypatch.setattr(checkpoint, "save", gated)
    saver = checkpoint.Saver()
    saver.submit([(tmp_path / "best.pt", {"w": w, "epoch": 1}), (tmp_path / "last.pt", {"w": w, "epoch": 1})])
    w.add_(1)  # the next steps train on, before the write has happened
    assert not (tmp_path / "last.pt").exists()
    gate.set()
    saver.submit([(tmp_path / "last.pt", {"w": w, "epoch": 2})])  # joins the first write
    assert torch.equal(checkpoint.load(tmp_path / "best.pt")["w"], torch.zeros(1000))
    saver.wait()
    assert order == ["best.pt", "last.pt", "last.pt"] and saver.longest_s > 0
    assert torch.equal(checkpoint.load(tmp_path / "last.pt")["w"], torch.ones(1000))

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", full)
    saver.submit([(tmp_path / "last.pt", {"w": w, "epoch": 3})])  # returns: the write fails in the thread
    with pytest.raises(OutputError, match="no space left"):
        saver.submit([(tmp_path / "last.pt", {"w": w, "epoch": 4})])
    saver.wait()  # the error is handed out once, and the submit that met it wrote nothing
    assert checkpoint.load(tmp_path / "last.pt")["epoch"] == 2


def test_the_saver_lands_its_write_when_the_run_fails_and_reports_the_runs_error(tmp_path):
    with pytest.raises(KeyError), checkpoint.Saver() as saver:
        saver.submit([(tmp_path / "last.pt", {"epoch": 1})])
        raise KeyError("the run's own error")
    assert checkpoint.load(tmp_path / "last.pt")["epoch"] == 1
    with pytest.raises(TypeError, match="cannot read back"):  # a state torch cannot load back: the caller's bug
        checkpoint.Saver().submit([(tmp_path / "c.pt", {"when": np.float64(1.0)})])
