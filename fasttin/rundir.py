"""STAND-IN (trainer branch only, so its tests run): the checkpoint helper owns fasttin/rundir.py and
the merge takes theirs. Implements the contract in notes/contracts.md, minimally."""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from fasttin.errors import UserError
from fasttin.fileio import clean_stale_tmp, ensure_writable

RUN_FILES = ("config.json", "metrics.jsonl", "last.pt", "best.pt")
RESUME_MAY_DIFFER = {"epochs", "out", "workers", "log_every", "device", "world_size", "environment", "resume",
                     "auto_resume", "overwrite", "profile", "num_classes", "fresh_init", "pretrained_reason"}


class RunDirError(UserError):
    pass


def prepare(out: Path, cfg: dict, *, resume: bool, auto_resume: bool, overwrite: bool) -> tuple[bool, list[str]]:
    out = Path(out)
    ensure_writable(out, folder=True)
    clean_stale_tmp(out)
    present = [f for f in RUN_FILES if (out / f).exists()]
    if auto_resume:
        resume = (out / "last.pt").exists()
        if not resume:
            return False, []
    if overwrite and present and not resume:
        aside = out / f"replaced-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}"
        aside.mkdir()
        for f in present:
            (out / f).rename(aside / f)
        return False, [f"moved the old run's files to {aside}"]
    if not resume:
        if present:
            raise RunDirError(f"{out} holds a run ({', '.join(present)}): --resume continues it, --auto-resume "
                              "continues it if it can, --overwrite moves it aside")
        return False, []
    for f in ("last.pt", "config.json"):
        if not (out / f).exists():
            raise RunDirError(f"--resume: {out / f} does not exist")
    old = json.loads((out / "config.json").read_text())
    diffs = [f"--{k.replace('_', '-')} {cfg.get(k)}, the run has {old.get(k)}" for k in sorted(set(cfg) | set(old))
             if k not in RESUME_MAY_DIFFER and cfg.get(k) != old.get(k)]
    if diffs:
        raise RunDirError(f"--resume {out}: settings differ from the run's: {'; '.join(diffs)}")
    notes = [f"--epochs {cfg['epochs']}, the run had {old['epochs']}"] if cfg.get("epochs") != old.get("epochs") else []
    return True, notes
