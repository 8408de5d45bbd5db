"""Run folders are protected: decide, before any work, whether a run starts fresh or resumes.

The trainer calls, on every rank and before anything is written into `out`:

    resume, notes = rundir.prepare_ranks(out, cfg, resume=..., auto_resume=..., overwrite=...,
                                         omitted=..., rank=rank, world=world)

which runs `prepare` on rank 0 only and broadcasts its decision, or its refusal, to the others.
`cfg` is the new run's resolved settings as they will be written to config.json (plain JSON
values; "classes" the list of wnids of the data, "epochs" the target). Any refusal is a
`RunDirError` (a UserError: one line, exit 2) and leaves every file in `out` as it was.

What `prepare` does:
- checks `out` is a writable folder (creating it), claims it (`fileio.claim`: a lock on out/.lock
  held until the run ends, so a second trainer there is refused, naming the holder's pid) and
  removes the `*.tmp<pid>` files that killed processes left there;
- no flag, and `out` holds any file of a run (RUN_FILES): refuses, naming the folder and the
  three ways out (--resume, --auto-resume, --overwrite, or another --out);
- `overwrite`: moves the earlier run's files (RUN_FILES) into `out/replaced-<UTC time>/` (renames in
  the same folder: nothing is deleted) and starts fresh;
- `resume`: needs out/last.pt and out/config.json. Every setting of `cfg` must equal the run's
  config.json, except RESUME_MAY_DIFFER (how and where it runs, not what it computes); each
  difference is named in one line ("--lr 0.1, the run has 0.02"), all of them at once. "classes"
  is compared as lists of wnids. A changed "epochs" is allowed (extending a run) and returned as a
  note;
- `auto_resume` (the flag to give under `torchrun --max-restarts`): resumes as above when
  out/last.pt exists, and starts fresh otherwise. Whatever an earlier attempt left without a
  last.pt (config.json, metric rows of an epoch whose checkpoint never landed, even a best.pt) is
  moved aside as with `overwrite` first, so a fresh start buries nothing and deletes nothing.
"""
from __future__ import annotations

import json
from pathlib import Path

from fasttin.errors import UserError
from fasttin.fileio import (
    claim,
    clean_stale_tmp,
    ensure_writable,
    move_aside,
    refuse_output_over_inputs,
    same_file,
    write_json_atomic,
)
from fasttin.info import environment
from fasttin.recipes import AMPS, AUTO, BASE, INT_LIMIT

# what a run writes: any of them means "a run is here", and --overwrite moves them all aside
RUN_FILES = ("config.json", "metrics.jsonl", "last.pt", "best.pt", "summary.json", "curves.png", "progress.json")
RESUME_MAY_DIFFER = frozenset({
    "epochs", "out", "workers", "log_every", "device", "world_size", "environment", "resume", "auto_resume",
    "overwrite", "profile", "compile_s", "fresh_init", "num_classes", "pretrained_reason",
    "channels_last", "chosen",  # the layout is chosen for the machine it runs on (tuning.py), and why
})
WAYS_OUT = "--resume to continue it, --auto-resume, --overwrite to move it aside, or another --out"


class RunDirError(UserError):
    """A run folder that would be damaged by this start, or a resume that would change the run."""


def write_config(out: Path, cfg: dict, **where) -> None:
    """out/config.json: every setting as actually used (after a fallback), with where it ran
    (`where`: world_size, device...) and the machine; what a resume is checked against."""
    write_json_atomic(out / "config.json", {**cfg, **where, "environment": environment()})


def recorded(out: Path) -> dict:
    """The run's own settings (its config.json), {} where there are none to read: what an omitted
    --epochs or a fallback to no pretrained weights mean on resume (`_check_resume` judges a damaged
    file)."""
    try:
        old = json.loads((Path(out) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return old if isinstance(old, dict) else {}


def will_resume(out: Path, *, resume: bool, auto_resume: bool) -> bool:
    """The decision `prepare` takes, without checking or touching anything (for the other ranks)."""
    return resume or (auto_resume and (Path(out) / "last.pt").is_file())


def prepare(out: Path, cfg: dict, *, resume: bool, auto_resume: bool, overwrite: bool,
            omitted=()) -> tuple[bool, list[str]]:
    """(resume?, notes to print); RunDirError when the start would lose or change a run. A resume
    takes the run's own values of the `omitted` settings into `cfg` (`inherit`) before comparing."""
    out = Path(out)
    if overwrite and (resume or auto_resume):
        raise RunDirError("--overwrite starts afresh; it cannot go with --resume or --auto-resume")
    if resume and auto_resume:
        raise RunDirError("give --resume (which requires last.pt) or --auto-resume (which resumes if it exists), "
                          "not both")
    if cfg.get("data"):
        refuse_output_over_inputs("--out", out, folders=[("the packed data set --data", cfg["data"])])
    ensure_writable(out, folder=True)
    holder = claim(out)
    if holder:
        raise RunDirError(f"{out} is in use by another run (pid {holder}): wait for it to end, or give another --out")
    notes = []
    stale = clean_stale_tmp(out, RUN_FILES.__contains__)
    if stale:
        notes.append(f"removed {len(stale)} temporary file(s) left by a killed process: "
                     + ", ".join(p.name for p in stale))
    present = [name for name in RUN_FILES if (out / name).exists()]
    if overwrite:
        if present:
            notes.append(_move_aside(out, "--overwrite"))
        return False, notes
    if will_resume(out, resume=resume, auto_resume=auto_resume):
        inherit(cfg, out, omitted)
        return True, notes + _check_resume(out, cfg)
    if auto_resume and present:
        notes.append(_move_aside(out, "--auto-resume found no last.pt to resume from, so it starts afresh"))
        return False, notes
    if present:
        raise RunDirError(f"{out} already holds a run ({', '.join(present)}): {WAYS_OUT}")
    return False, notes


def _move_aside(out: Path, why: str) -> str:
    """Rename the run's files into a fresh out/replaced-<UTC time>/; returns the note to print."""
    dest, moved = move_aside(out, list(RUN_FILES), "replaced")
    return f"{why}: moved the earlier run's {', '.join(moved)} to {dest}"


def _same(old, new) -> bool:
    """Equal settings, or two spellings of one existing path (data/tin and /home/me/data/tin)."""
    if old == new:
        return True
    return isinstance(old, str) and isinstance(new, str) and bool(old and new) and same_file(Path(old), Path(new))


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _describe_classes(new: list, old: list) -> str:
    if len(new) != len(old):
        return f"the data has {len(new)} classes, the run was trained on {len(old)}"
    i = next(i for i, (a, b) in enumerate(zip(new, old)) if a != b)
    other = len(set(new) - set(old))
    return (f"the data's classes are not the run's (class {i} is {new[i]} in the data, {old[i]} in the run; "
            + (f"{other} wnid(s) differ)" if other else "the same wnids in another order)"))


def _check_resume(out: Path, cfg: dict) -> list[str]:
    """The notes of an allowed resume; RunDirError naming every setting that would change the run."""
    for name in ("last.pt", "config.json"):
        if not (out / name).is_file():
            raise RunDirError(f"cannot resume: {out / name} is missing; start a new run without --resume "
                              "(--overwrite moves the old files aside)")
    try:
        old = json.loads((out / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunDirError(f"cannot resume: {out / 'config.json'} is unreadable ({e})") from None
    if not isinstance(old, dict):
        raise RunDirError(f"cannot resume: {out / 'config.json'} is not a settings object")
    new = json.loads(json.dumps(cfg, default=str))  # tuples -> lists, paths -> str: compare as recorded
    differ = []
    for key in sorted(new):
        if key in RESUME_MAY_DIFFER or (key in old and _same(old[key], new[key])):
            continue
        if key not in old and key in BASE and _same(BASE[key], new[key]):
            continue  # a setting newer than the run, at its default: what the run computed
        if key == "classes" and isinstance(old.get(key), list) and isinstance(new[key], list):
            differ.append(_describe_classes(new[key], old[key]))
        elif key not in old:
            differ.append(f"{_flag(key)} {new[key]}, the run has no such setting")
        else:
            differ.append(f"{_flag(key)} {new[key]}, the run has {old[key]}")
    if differ:
        raise RunDirError(f"--resume would change the run in {out}: {'; '.join(differ)} "
                          "(resume with the run's settings, or start a new run with another --out)")
    notes = []  # the trainer says itself that it resumed, and from where
    if "epochs" in new and new["epochs"] != old.get("epochs"):
        notes.append(f"--epochs {new['epochs']}: the run had {old.get('epochs')}; the new target is recorded "
                     "in config.json")
    return notes


def inherit(cfg: dict, out: Path, omitted) -> None:
    """A resume keeps the run's own value of a setting the command line left out (`omitted`): its
    --epochs target (a finished run is not silently extended to the recipe's default), and its
    fallback from the recipe's ImageNet weights to none; and with --amp left to the machine, the
    run's own precision (a run is one precision; tuning warns if it is slow here)."""
    was = recorded(out)
    epochs = was.get("epochs")
    if "epochs" in omitted and was:  # an unreadable config.json: _check_resume names it
        if type(epochs) is not int or not 1 <= epochs < INT_LIMIT:  # never the recipe's default: it may extend a run
            raise RunDirError(f"{Path(out) / 'config.json'}: its epochs is {repr(epochs)[:40]}, not a number of "
                              "epochs; give --epochs N to resume")
        cfg["epochs"] = epochs
    if cfg.get("amp") == AUTO and was.get("amp") in AMPS:  # its precision, not this machine's choice
        cfg["amp"] = was["amp"]
    if ("pretrained" in omitted and cfg["pretrained"] == "imagenet" and was.get("pretrained") == "none"
            and was.get("pretrained_reason")):
        cfg.update(pretrained="none", pretrained_reason=was["pretrained_reason"])


def prepare_ranks(out: Path, cfg: dict, *, resume: bool, auto_resume: bool, overwrite: bool,
                  omitted=(), rank: int = 0, world: int = 1) -> tuple[bool, list[str]]:
    """`prepare` on rank 0, its decision (or its refusal) broadcast to every rank under torchrun;
    a resumed run keeps its own values of the `omitted` settings (`inherit`) on every rank."""
    import torch.distributed as dist
    result = None
    if rank == 0:
        try:
            result = prepare(out, cfg, resume=resume, auto_resume=auto_resume, overwrite=overwrite, omitted=omitted)
        except UserError as e:
            result = e
    if world > 1:
        box = [result]
        dist.broadcast_object_list(box, src=0)
        result = box[0]
    if isinstance(result, UserError):
        raise result
    if result[0] and rank != 0:
        inherit(cfg, out, omitted)
    return result
