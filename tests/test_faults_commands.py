"""Faults against checkpoint loading, eval and predict: each one is a single line naming the
culprit, exit 2, no traceback, and nothing lost (old outputs byte-identical, no complete-looking
output from a failed command, no temporary file left behind)."""
import csv
import errno
import io
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from helpers import error_line, run_cli
from PIL import Image

from fasttin import checkpoint
from fasttin import eval as eval_cmd
from fasttin import predict as predict_cmd
from fasttin.model import build_model
from fasttin.pack import pack
from fasttin.shards import read_manifest

RES = 32


class Payload:
    """Unpickled without restriction, this would create the file `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def fasttin_ckpt(path, classes, stem="cifar"):
    torch.manual_seed(0)
    checkpoint.save(path, {"model": build_model(len(classes), stem).state_dict(), "classes": classes,
                           "words": [f"thing {c}" for c in classes],
                           "arch": {"name": "resnet18", "stem": stem, "num_classes": len(classes), "res": RES}})
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny packed set, a checkpoint of its classes, one of other classes, and test images."""
    root = tmp_path_factory.mktemp("faults")
    pack(None, root / "data", synthetic=5, classes=4, workers=1, quiet=True)
    wnids = [c["wnid"] for c in read_manifest(root / "data")["classes"]]
    Image.new("RGB", (50, 40), (200, 30, 30)).save(root / "a.png")
    Image.new("RGB", (64, 64), (10, 90, 30)).save(root / "b.jpg", quality=90)
    return {"root": root, "data": root / "data", "wnids": wnids, "good": fasttin_ckpt(root / "good.pt", wnids),
            "other": fasttin_ckpt(root / "other.pt", [w[:-1] + "x" for w in wnids])}


@dataclass
class Case:
    command: str  # eval | predict
    args: list  # {ckpt} {data} {tmp} {img} are filled in
    culprit: str  # in the one error line, after filling in
    rc: int = 2
    ckpt: str = "good"  # good | other | evil | evil-legacy | cut | foreign
    old: dict = field(default_factory=dict)  # outputs that exist before: must stay byte-identical
    absent: str | None = None  # the output a failed command must not leave
    patch: str | None = None  # fsync-full | bomb
    stdout_keeps: str | None = None  # computed results printed although the write failed


EVAL = ["--data", "{data}", "--device", "cpu", "--backend", "resident", "--batch-size", "8"]
PRED = ["{img}", "--device", "cpu"]
CASES = {
    "eval-hostile-pickle": Case("eval", EVAL, "{ckpt}: refused", ckpt="evil"),
    "eval-hostile-legacy-pickle": Case("eval", EVAL, "{ckpt}", ckpt="evil-legacy"),
    "predict-hostile-pickle": Case("predict", PRED, "{ckpt}: refused", ckpt="evil"),
    "predict-split-hostile-pickle": Case("predict", ["--split", "test", "--data", "{data}", "--device", "cpu"],
                                         "{ckpt}: refused", ckpt="evil"),
    "eval-truncated-checkpoint": Case("eval", EVAL + ["--json", "{tmp}/e.json"], "{ckpt} is not a torch checkpoint",
                                      ckpt="cut", absent="e.json"),
    "predict-truncated-checkpoint": Case("predict", PRED, "{ckpt} is not a torch checkpoint", ckpt="cut"),
    "eval-another-models-state-dict": Case("eval", EVAL, "{ckpt} is not a fasttin checkpoint", ckpt="foreign"),
    "predict-another-models-state-dict": Case("predict", PRED, "{ckpt} is not a fasttin checkpoint", ckpt="foreign"),
    "eval-other-classes": Case("eval", EVAL, "{ckpt} was trained on other classes", ckpt="other"),
    "predict-split-other-classes": Case("predict", ["--split", "test", "--data", "{data}", "--device", "cpu"],
                                        "{ckpt} was trained on other classes", ckpt="other"),
    "eval-json-in-missing-folder": Case("eval", EVAL + ["--json", "{tmp}/new/deeper/e.json"], "", rc=0),
    "predict-csv-in-missing-folder": Case("predict", PRED + ["--csv", "{tmp}/new/p.csv"], "", rc=0),
    "eval-json-under-a-file": Case("eval", EVAL + ["--json", "{tmp}/old.json/e.json"], "{tmp}/old.json/e.json",
                                   old={"old.json": b'{"top1": 0.5}\n'}),
    "eval-json-read-only-place": Case("eval", EVAL + ["--json", "/proc/fasttin-e.json"], "/proc/fasttin-e.json"),
    "predict-csv-is-a-folder": Case("predict", PRED + ["--csv", "{tmp}/out"], "{tmp}/out: it is a folder",
                                    old={"out/keep.csv": b"file,top1\n"}),
    "eval-json-disk-full": Case("eval", EVAL + ["--json", "{tmp}/e.json"], "cannot write {tmp}/e.json: no space",
                                old={"e.json": b'{"top1": 0.25}\n'}, patch="fsync-full", stdout_keeps='"top1"'),
    "predict-csv-disk-full": Case("predict", PRED + ["--csv", "{tmp}/p.csv"], "cannot write {tmp}/p.csv: no space",
                                  old={"p.csv": b"file,top1\nold\n"}, patch="fsync-full", stdout_keeps="file,top1"),
    "eval-device-tpu": Case("eval", ["--data", "{data}", "--device", "tpu"], "--device tpu"),
    "predict-device-missing-gpu": Case("predict", ["{img}", "--device", "cuda:7"], "--device cuda:7"),
    "predict-not-an-image": Case("predict", ["{tmp}/notes.png", "--device", "cpu", "--csv", "{tmp}/p.csv"],
                                 "{tmp}/notes.png: not an image", old={"notes.png": b"just text"}, absent="p.csv"),
    "predict-truncated-image": Case("predict", ["{img}", "{tmp}/cut.jpg", "--device", "cpu", "--csv", "{tmp}/p.csv"],
                                    "{tmp}/cut.jpg: not an image", absent="p.csv"),
    "predict-decompression-bomb": Case("predict", PRED, "{img}: not an image", patch="bomb"),
    "predict-missing-input": Case("predict", ["{tmp}/nope.png", "--device", "cpu"], "{tmp}/nope.png: no such file"),
}


def make_ckpt(kind, inputs, tmp):
    if kind in ("good", "other"):
        return inputs[kind]
    path = tmp / f"{kind}.pt"
    if kind == "evil":
        torch.save({"model": Payload(tmp / "PWNED"), "arch": {"name": "resnet18"}}, path)
    elif kind == "evil-legacy":
        path.write_bytes(pickle.dumps({"model": Payload(tmp / "PWNED")}))
    elif kind == "cut":
        path.write_bytes(inputs["good"].read_bytes()[:100_000])
    elif kind == "foreign":
        from torchvision.models import resnet34
        torch.save(resnet34(num_classes=4).state_dict(), path)
    return path


def tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name", list(CASES))
def test_fault(name, inputs, tmp_path, capsys, monkeypatch):
    case = CASES[name]
    ckpt = make_ckpt(case.ckpt, inputs, tmp_path)
    for rel, data in case.old.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    (tmp_path / "cut.jpg").write_bytes((inputs["root"] / "b.jpg").read_bytes()[:400])
    fill = {"ckpt": ckpt, "data": inputs["data"], "tmp": tmp_path, "img": inputs["root"] / "a.png"}
    argv = ["--ckpt", str(ckpt)] + [a.format(**fill) for a in case.args]
    if case.patch == "fsync-full":
        def full(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(os, "fsync", full)
    elif case.patch == "bomb":
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # a.png's 2000 pixels are a "bomb" past 2x this
    before = tree(tmp_path)
    main = eval_cmd.main if case.command == "eval" else predict_cmd.main
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == case.rc, err
    assert not (tmp_path / "PWNED").exists(), "the checkpoint's payload ran"
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name], "a temporary file was left"
    if rc == 0:
        assert err == ""
        written = [p for p in tmp_path.rglob("*") if p.suffix in (".json", ".csv")]
        assert len(written) == 1 and written[0].stat().st_size > 0
        return
    error_line(err, case.culprit.format(**fill), prefix=f"fasttin.{case.command}: error: ")
    after = tree(tmp_path)
    for rel in case.old:
        assert after[rel] == before[rel], f"{rel} changed"
    if case.absent:
        assert not (tmp_path / case.absent).exists()
    if case.stdout_keeps:
        assert case.stdout_keeps in out, "the computed result was thrown away"


@pytest.mark.parametrize("command", ["fasttin.eval", "fasttin.predict"])
def test_hostile_checkpoint_through_the_command_line(inputs, tmp_path, command):
    """As a user runs it: one line on stderr, exit 2, and the payload never ran."""
    ckpt = make_ckpt("evil", inputs, tmp_path)
    extra = ["--data", inputs["data"]] if command == "fasttin.eval" else [inputs["root"] / "a.png"]
    r = run_cli(command, "--ckpt", ckpt, *extra, "--device", "cpu")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and f"{ckpt}: refused" in r.stderr
    assert not (tmp_path / "PWNED").exists() and r.stdout == ""


def test_predict_treats_names_from_the_data_as_data(inputs, tmp_path):
    """A sample name with separators and control characters is written into the CSV, quoted, and
    never followed as a path."""
    rows = [("../../escape\n.JPEG", ["n1", "n2"], 0.5), ("/abs/x.JPEG", ["n2", "n1"], 0.25)]
    text = predict_cmd.csv_text(rows)
    back = list(csv.reader(io.StringIO(text)))
    assert back[1][0] == "../../escape\n.JPEG" and back[2][0] == "/abs/x.JPEG"
    assert predict_cmd.shown("a\nb") == "'a\\nb'"
