"""rundir.prepare on fake run folders: nothing of an earlier run is lost or silently changed."""
import json
import os
import re
import subprocess
import sys

import pytest
from helpers import snapshot

from fasttin import rundir
from fasttin.errors import UserError
from fasttin.rundir import RunDirError, prepare

CFG = {"recipe": "fast-64", "lr": 0.02, "batch_size": 256, "res": 64, "epochs": 10, "out": "x",
       "workers": 4, "classes": ["n01", "n02", "n03"], "data": "data/tin"}


def fake_run(folder, cfg=CFG, last=True, rows=1):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**cfg, "world_size": 1, "environment": {"torch": "x"}}))
    (folder / "metrics.jsonl").write_text("".join(json.dumps({"epoch": i + 1}) + "\n" for i in range(rows)))
    if last:
        (folder / "last.pt").write_bytes(b"last-checkpoint")
        (folder / "best.pt").write_bytes(b"best-checkpoint")
    return snapshot(folder)


def test_empty_or_missing_folder_starts_fresh(tmp_path):
    assert prepare(tmp_path / "new" / "run", CFG, resume=False, auto_resume=False, overwrite=False) == (False, [])
    assert (tmp_path / "new" / "run").is_dir()


@pytest.mark.parametrize("present", rundir.RUN_FILES)  # a finished run whose checkpoints were archived too
def test_a_run_is_refused_without_a_flag_and_left_byte_identical(tmp_path, present):
    (tmp_path / present).write_bytes(b"old")
    before = snapshot(tmp_path)
    with pytest.raises(RunDirError) as e:
        prepare(tmp_path, CFG, resume=False, auto_resume=False, overwrite=False)
    msg = str(e.value)
    assert str(tmp_path) in msg and present in msg and "\n" not in msg
    assert all(flag in msg for flag in ("--resume", "--auto-resume", "--overwrite"))
    assert snapshot(tmp_path) == before and issubclass(RunDirError, UserError)


def test_a_folder_another_live_run_holds_is_refused_naming_its_pid_and_free_once_it_ends(tmp_path):
    """Two trainers on one --out would each write over the other's files: the second is refused."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from fasttin.fileio import claim; "
                               "claim(sys.argv[1]); print('held', flush=True); sys.stdin.read()", str(tmp_path)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = fake_run(tmp_path)
        for flags in ({"resume": True}, {"auto_resume": True}, {"overwrite": True}, {}):
            with pytest.raises(RunDirError, match=f"in use by another run \\(pid {holder.pid}\\)"):
                prepare(tmp_path, CFG, **{"resume": False, "auto_resume": False, "overwrite": False, **flags})
        assert snapshot(tmp_path) == before
    finally:
        holder.communicate("")
    assert prepare(tmp_path, CFG, resume=True, auto_resume=False, overwrite=False)[0] is True


@pytest.mark.parametrize("inside", ["", "runs/x"])
def test_a_run_folder_inside_the_data_set_is_refused_before_anything_is_written(tmp_path, inside):
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text("{}")
    with pytest.raises(UserError, match="lies inside the packed data set"):
        prepare(data / inside, {**CFG, "data": str(data)}, resume=False, auto_resume=False, overwrite=False)
    assert [p.name for p in data.iterdir()] == ["manifest.json"]


def test_overwrite_moves_the_old_run_aside_and_deletes_nothing(tmp_path):
    before = fake_run(tmp_path)
    (tmp_path / "summary.json").write_text("{}")
    before = snapshot(tmp_path)
    resume, notes = prepare(tmp_path, CFG, resume=False, auto_resume=False, overwrite=True)
    assert resume is False and "moved" in notes[0]
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("replaced-")]
    assert len(aside) == 1 and not any((tmp_path / n).exists() for n in rundir.RUN_FILES)
    assert snapshot(aside[0]) == before
    # a second overwrite in the same second does not collide with the first
    fake_run(tmp_path)
    prepare(tmp_path, CFG, resume=False, auto_resume=False, overwrite=True)
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("replaced-")]) == 2


def test_auto_resume_resumes_when_last_pt_exists(tmp_path):
    before = fake_run(tmp_path)
    resume, notes = prepare(tmp_path, {**CFG, "workers": 8}, resume=False, auto_resume=True, overwrite=False)
    assert resume is True and snapshot(tmp_path) == before
    assert rundir.will_resume(tmp_path, resume=False, auto_resume=True)


def test_auto_resume_starts_fresh_without_last_pt(tmp_path):
    assert prepare(tmp_path / "a", CFG, resume=False, auto_resume=True, overwrite=False) == (False, [])
    # an attempt that died before its first checkpoint: moved aside, fresh start
    before = fake_run(tmp_path / "b", last=False, rows=0)
    resume, notes = prepare(tmp_path / "b", CFG, resume=False, auto_resume=True, overwrite=False)
    assert resume is False and "no last.pt" in notes[0]
    (aside,) = (tmp_path / "b").glob("replaced-*")
    assert snapshot(aside) == before


def test_auto_resume_moves_results_without_last_pt_aside(tmp_path):
    """Killed between writing epoch 1's metrics row and its last.pt: a fresh start, rows kept aside."""
    before = fake_run(tmp_path, last=False, rows=1)
    resume, notes = prepare(tmp_path, CFG, resume=False, auto_resume=True, overwrite=False)
    (aside,) = tmp_path.glob("replaced-*")
    assert resume is False and snapshot(aside) == before and "metrics.jsonl" in notes[0]


def test_resume_names_every_differing_setting_at_once(tmp_path):
    before = fake_run(tmp_path)
    new = {**CFG, "lr": 0.1, "batch_size": 512, "res": 96, "workers": 1, "out": "elsewhere", "label_smoothing": 0.1}
    with pytest.raises(RunDirError) as e:
        prepare(tmp_path, new, resume=True, auto_resume=False, overwrite=False)
    msg = str(e.value)
    assert "--lr 0.1, the run has 0.02" in msg and "--batch-size 512, the run has 256" in msg
    assert "--res 96, the run has 64" in msg and "--label-smoothing 0.1, the run has no such setting" in msg
    assert "workers" not in msg and "elsewhere" not in msg and "\n" not in msg
    assert snapshot(tmp_path) == before


def test_a_run_older_than_a_setting_resumes_at_its_default_only(tmp_path):
    """A run folder written before a setting existed (--mixup, say) computed its default: a resume
    at that default goes on; another value is named as the run has no such setting."""
    fake_run(tmp_path)
    assert prepare(tmp_path, {**CFG, "mixup": 0.0, "mix_share": 1.0}, resume=True, auto_resume=False,
                   overwrite=False)[0] is True
    with pytest.raises(RunDirError, match="--mixup 0.2, the run has no such setting"):
        prepare(tmp_path, {**CFG, "mixup": 0.2}, resume=True, auto_resume=False, overwrite=False)


@pytest.mark.parametrize("classes, why", [
    (["n01", "n02", "n04"], "class 2 is n04 in the data, n03 in the run; 1 wnid(s) differ"),
    (["n01", "n03", "n02"], "the same wnids in another order"),
    (["n01", "n02"], "the data has 2 classes, the run was trained on 3"),
])
def test_resume_compares_classes_as_wnid_lists(tmp_path, classes, why):
    fake_run(tmp_path)
    with pytest.raises(RunDirError, match=re.escape(why)):
        prepare(tmp_path, {**CFG, "classes": classes}, resume=True, auto_resume=False, overwrite=False)


def test_resume_takes_another_spelling_of_the_same_data_path(tmp_path, monkeypatch):
    (tmp_path / "data" / "tin").mkdir(parents=True)
    fake_run(tmp_path / "run", {**CFG, "data": str(tmp_path / "data" / "tin")})
    monkeypatch.chdir(tmp_path)
    assert prepare(tmp_path / "run", {**CFG, "data": "data/tin"}, resume=True, auto_resume=False, overwrite=False)[0]
    (tmp_path / "data" / "other").mkdir()
    with pytest.raises(RunDirError, match="--data data/other, the run has"):
        prepare(tmp_path / "run", {**CFG, "data": "data/other"}, resume=True, auto_resume=False, overwrite=False)


def test_resume_may_extend_epochs_with_a_note(tmp_path):
    before = fake_run(tmp_path)
    resume, notes = prepare(tmp_path, {**CFG, "epochs": 30, "workers": 2}, resume=True, auto_resume=False,
                            overwrite=False)
    assert resume is True and any("--epochs 30: the run had 10" in n for n in notes)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("missing", ["last.pt", "config.json"])
def test_resume_needs_last_pt_and_config(tmp_path, missing):
    fake_run(tmp_path)
    (tmp_path / missing).unlink()
    with pytest.raises(RunDirError, match=f"{missing} is missing"):
        prepare(tmp_path, CFG, resume=True, auto_resume=False, overwrite=False)


def test_conflicting_flags_are_refused(tmp_path):
    for flags in ({"resume": True, "auto_resume": False}, {"resume": False, "auto_resume": True}):
        with pytest.raises(RunDirError, match="--overwrite"):
            prepare(tmp_path, CFG, overwrite=True, **flags)
    with pytest.raises(RunDirError, match="not both"):
        prepare(tmp_path, CFG, resume=True, auto_resume=True, overwrite=False)


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (tmp_path / f"last.pt.tmp{dead}").write_bytes(b"half")
    (tmp_path / f"metrics.jsonl.tmp{os.getppid()}").write_bytes(b"live")  # a live process's: kept
    (tmp_path / f"notes.tmp{dead}.txt").write_bytes(b"mine")  # a user's file, named alike: kept
    _, notes = prepare(tmp_path, CFG, resume=False, auto_resume=False, overwrite=False)
    assert not (tmp_path / f"last.pt.tmp{dead}").exists() and (tmp_path / f"metrics.jsonl.tmp{os.getppid()}").exists()
    assert f"last.pt.tmp{dead}" in notes[0] and (tmp_path / f"notes.tmp{dead}.txt").read_bytes() == b"mine"


def test_an_unwritable_run_folder_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError) as e:
        prepare(tmp_path / "afile" / "run", CFG, resume=False, auto_resume=False, overwrite=False)
    assert str(tmp_path / "afile" / "run") in str(e.value) and "\n" not in str(e.value)
    assert (tmp_path / "afile").read_text() == "x"


@pytest.mark.parametrize("recorded, omitted, want", [
    (3, {"epochs"}, 3),                      # omitted: the run's own target
    (3, set(), 10),                          # given: the command line's
    ("3", {"epochs"}, None), (0, {"epochs"}, None), (True, {"epochs"}, None), (2.0, {"epochs"}, None),
    (None, {"epochs"}, None),                # damaged: refused, never replaced by the recipe's default
    (10**400, {"epochs"}, None), (2**53, {"epochs"}, None),  # beyond what the schedule's floats hold
    ("3", set(), 10),                        # damaged but given: the command line's
])
def test_a_resume_inherits_only_omitted_settings_and_only_sound_values(tmp_path, recorded, omitted, want):
    before = fake_run(tmp_path, {**CFG, "epochs": recorded, "pretrained": "none", "pretrained_reason": "offline"})
    cfg = {**CFG, "pretrained": "imagenet"}
    if want is None:
        with pytest.raises(RunDirError, match=r"config.json: its epochs is .*give --epochs N"):
            prepare(tmp_path, cfg, resume=True, auto_resume=False, overwrite=False, omitted=omitted)
        assert snapshot(tmp_path) == before
        return
    rundir.inherit(cfg, tmp_path, omitted)
    assert cfg["epochs"] == want and cfg["pretrained"] == "imagenet"  # --pretrained was given (not omitted)
    rundir.inherit(cfg, tmp_path, {"pretrained"})
    assert cfg["pretrained"] == "none" and cfg["pretrained_reason"] == "offline"


def test_a_fresh_start_inherits_nothing_from_the_files_it_moves_aside(tmp_path):
    """--auto-resume without last.pt starts afresh: the leftover config.json's target is not taken."""
    fake_run(tmp_path, {**CFG, "epochs": 3}, last=False)
    cfg = dict(CFG)
    assert prepare(tmp_path, cfg, resume=False, auto_resume=True, overwrite=False, omitted={"epochs"})[0] is False
    assert cfg["epochs"] == 10
    fake_run(tmp_path / "again", {**CFG, "epochs": 3})  # with last.pt it resumes, keeping the run's own
    assert prepare(tmp_path / "again", cfg, resume=False, auto_resume=True, overwrite=False, omitted={"epochs"}) == (
        True, [])
    assert cfg["epochs"] == 3


@pytest.mark.parametrize("given, recorded, want", [("auto", "bf16", "bf16"), ("auto", "off", "off"),
                                                   ("bf16", "bf16", "bf16")])
def test_a_resume_keeps_the_run_s_precision_and_may_change_its_layout(tmp_path, given, recorded, want):
    """--amp left to the machine keeps the run's own (an AMX run resumed on an AVX2 CPU stays bf16,
    with tuning's line saying it is slow there); the layout is how it runs, chosen afresh."""
    fake_run(tmp_path, {**CFG, "amp": recorded, "channels_last": True, "chosen": {"amp": "bf16: AMX"}})
    cfg = {**CFG, "amp": given, "channels_last": None}
    assert prepare(tmp_path, cfg, resume=True, auto_resume=False, overwrite=False) == (True, [])
    assert cfg["amp"] == want


def test_a_resume_with_another_precision_given_is_refused(tmp_path):
    before = fake_run(tmp_path, {**CFG, "amp": "bf16"})
    with pytest.raises(RunDirError, match="--amp off, the run has bf16"):
        prepare(tmp_path, {**CFG, "amp": "off"}, resume=True, auto_resume=False, overwrite=False)
    assert snapshot(tmp_path) == before
