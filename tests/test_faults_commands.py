"""Faults against checkpoint loading, eval and predict: each one is a single line naming the
culprit, exit 2, no traceback, and nothing lost (old outputs byte-identical, no complete-looking
output from a failed command, no temporary file left behind)."""
import csv
import errno
import io
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from helpers import ROOT, Lines, error_line, refused, run_cli
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
            "other": fasttin_ckpt(root / "other.pt", [w + "x" for w in wnids])}


@dataclass
class Case:
    command: str  # eval | predict
    args: list  # {ckpt} {data} {tmp} {img} are filled in
    culprit: str  # in the one error line, after filling in
    rc: int = 2
    ckpt: str = "good"  # good | other | evil | evil-legacy | cut | foreign | rot | nan
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
    # torch.load checks no CRC: 4 bytes flipped in a tensor gave NaN loss, exit 0, and "loss": NaN in the JSON
    "eval-bit-rot-in-a-tensor": Case("eval", EVAL + ["--json", "{tmp}/e.json"],
                                     "{ckpt} is not a torch checkpoint, or a damaged one (its member archive/data/",
                                     ckpt="rot", absent="e.json"),
    "predict-bit-rot-in-a-tensor": Case("predict", PRED, "fails its CRC check", ckpt="rot"),
    "eval-non-finite-weights": Case("eval", EVAL, "{ckpt}: its weights are not finite (fc.bias", ckpt="nan"),
    "predict-non-finite-weights": Case("predict", PRED, "{ckpt}: its weights are not finite (fc.bias", ckpt="nan"),
    "predict-empty-folder": Case("predict", ["{tmp}/empty", "--device", "cpu", "--csv", "{tmp}/p.csv"],
                                 "{tmp}/empty: no images", old={"empty/notes.txt": b"no image here"}, absent="p.csv"),
    "eval-res-above-the-rule": Case("eval", EVAL + ["--res", "600"], "--res 600: a resolution is a whole number"),
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
    elif kind == "rot":
        path.write_bytes(inputs["good"].read_bytes())
        rot(path)
    elif kind == "nan":  # intact as a file (its CRCs match) but its weights are not finite
        state = checkpoint.load(inputs["good"])
        state["model"]["fc.bias"][1] = float("nan")
        checkpoint.save(path, state)
    return path


def rot(path):
    """Flip 4 bytes in the middle of the largest tensor's data inside the zip `path` (bit rot)."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))  # the local header's own lengths
        f.seek(info.header_offset + 30 + name_len + extra_len + info.file_size // 2)
        f.write(b"\xff" * 4)


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


# ---- an output that is also an input ---------------------------------------------------------------

CLOBBER = {  # (command, arguments, the two names the one line must hold); {ckpt} {data} {img} {tmp} filled in
    "eval-json-over-the-manifest": ("eval", EVAL + ["--json", "{data}/manifest.json"], ["--json", "{data}"]),
    "eval-json-new-file-in-the-pack": ("eval", EVAL + ["--json", "{tmp}/link/../data/e.json"], ["{data}"]),
    "eval-json-over-the-checkpoint": ("eval", EVAL + ["--json", "{ckpt}"], ["--json {ckpt}", "the --ckpt"]),
    "eval-json-hard-link-to-the-checkpoint": ("eval", EVAL + ["--json", "{tmp}/hard.pt"], ["{tmp}/hard.pt", "{ckpt}"]),
    "predict-csv-over-the-checkpoint": ("predict", PRED + ["--csv", "{ckpt}"], ["--csv {ckpt}", "the --ckpt"]),
    "predict-csv-over-an-input-image": ("predict", PRED + ["--csv", "{img}"], ["--csv {img}", "input image {img}"]),
    "predict-csv-symlink-to-an-image-in-a-folder": (
        "predict", ["{tmp}/imgs", "--device", "cpu", "--csv", "{tmp}/sym.png"], ["{tmp}/sym.png", "{tmp}/imgs/c.png"]),
    "predict-split-csv-into-the-pack": (
        "predict", ["--split", "test", "--data", "{data}", "--device", "cpu", "--csv", "{data}/test.csv"],
        ["{data}/test.csv", "the --data folder {data}"]),
}


@pytest.mark.parametrize("name", list(CLOBBER))
def test_an_output_that_is_an_input_is_refused_before_any_work(name, inputs, tmp_path, capsys):
    """`eval --json DATA/manifest.json` replaced the pack's manifest and `predict --csv CKPT` (or an
    input image) the checkpoint, exit 0. Now: one line naming both, exit 2, every input intact."""
    command, args, culprits = CLOBBER[name]
    shutil.copytree(inputs["data"], tmp_path / "data")
    ckpt = Path(shutil.copy(inputs["good"], tmp_path / "good.pt"))
    img = Path(shutil.copy(inputs["root"] / "a.png", tmp_path / "a.png"))
    (tmp_path / "imgs").mkdir()
    shutil.copy(img, tmp_path / "imgs" / "c.png")
    (tmp_path / "sym.png").symlink_to(tmp_path / "imgs" / "c.png")
    (tmp_path / "link").symlink_to(tmp_path / "imgs")
    os.link(ckpt, tmp_path / "hard.pt")
    fill = {"ckpt": ckpt, "data": tmp_path / "data", "img": img, "tmp": tmp_path}
    before = tree(tmp_path)
    main = eval_cmd.main if command == "eval" else predict_cmd.main
    rc = main(["--ckpt", str(ckpt)] + [a.format(**fill) for a in args])
    out, err = capsys.readouterr()
    assert rc == 2, err
    error_line(err, *(c.format(**fill) for c in culprits), prefix=f"fasttin.{command}: error: ")
    assert tree(tmp_path) == before and out == ""


# ---- what a checkpoint says is data, shown as data -------------------------------------------------------

FORGED = "x\x1b[31m\nfasttin.predict: error: fake"


def test_a_class_id_with_control_characters_is_refused(inputs, tmp_path):
    """Class ids are printed and written into CSVs: one that fails the pack's name rule (here an
    escape sequence and a newline forging an error line) is refused in one line, never printed raw."""
    ckpt = fasttin_ckpt(tmp_path / "forged.pt", [inputs["wnids"][0], FORGED, *inputs["wnids"][2:]])
    r = run_cli("fasttin.predict", "--ckpt", ckpt, inputs["root"] / "a.png", "--device", "cpu")
    line = refused(r, 2, f"{ckpt}: its class", "control character", prefix="fasttin.predict: error: ")
    assert "\x1b" not in r.stderr + r.stdout and r.stdout == "" and "fake" in line


def test_a_duplicate_class_id_is_refused(inputs, tmp_path, capsys):
    ckpt = fasttin_ckpt(tmp_path / "twice.pt", [inputs["wnids"][0]] * 2 + inputs["wnids"][2:])
    assert predict_cmd.main(["--ckpt", str(ckpt), str(inputs["root"] / "a.png"), "--device", "cpu"]) == 2
    error_line(capsys.readouterr().err, "is there twice", str(ckpt))


def test_descriptions_with_control_characters_are_printed_escaped(inputs, tmp_path):
    """'words' are free text: an escape sequence or a newline in them is shown as its repr-escape,
    so a checkpoint can neither colour the terminal nor forge an error line."""
    ckpt = tmp_path / "words.pt"
    state = checkpoint.load(inputs["good"])
    state["words"] = [FORGED] * len(inputs["wnids"])
    checkpoint.save(ckpt, state)
    r = run_cli("fasttin.predict", "--ckpt", ckpt, inputs["root"] / "a.png", "--device", "cpu")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert "\x1b" not in r.stdout and r.stdout.count("\n") == 1, r.stdout
    assert "x\\x1b[31m\\nfasttin.predict: error: fake" in r.stdout


# ---- predict sees an image as the packer stores it -------------------------------------------------------

def test_predict_converts_images_as_the_packer_does(tmp_path):
    """predict's own `convert("RGB")` clipped 16-bit grey (32896 became 255, the pack stores 128)
    and showed the hidden colour of transparent pixels (the pack composites them on black)."""
    Image.new("I;16", (20, 20), 32896).save(tmp_path / "grey16.png")
    Image.new("RGBA", (20, 20), (250, 10, 10, 0)).save(tmp_path / "clear.png")
    grey = predict_cmd.load_image(tmp_path / "grey16.png", 32)
    assert grey.shape == (32, 32, 3) and (grey == 128).all(), grey[0, 0]
    assert (predict_cmd.load_image(tmp_path / "clear.png", 32) == 0).all()


def test_a_float_image_is_refused_by_name_before_any_prediction(inputs, tmp_path, capsys):
    """A mode-F TIFF (no defined range) became silently black: now refused, naming it and its
    mode, before any prediction (the good image named first is not predicted either)."""
    Image.new("F", (20, 20), 0.5).save(tmp_path / "float.tif")
    rc = predict_cmd.main(["--ckpt", str(inputs["good"]), str(inputs["root"] / "a.png"), str(tmp_path / "float.tif"),
                           "--device", "cpu"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    error_line(err, f"{tmp_path}/float.tif", "pixel mode F", prefix="fasttin.predict: error: ")


# ---- an empty split --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def empty_test_split(tmp_path_factory):
    """A pack whose test split holds no sample, and a checkpoint of its classes."""
    from fasttin.synthetic import make_layout
    root = tmp_path_factory.mktemp("empty-split")
    pack(make_layout(root / "src", n_classes=2, per_class=2, val_per_class=1, test_count=0), root / "data",
         workers=1, quiet=True)
    assert read_manifest(root / "data")["splits"]["test"]["count"] == 0
    return root / "data", fasttin_ckpt(root / "c.pt", [c["wnid"] for c in read_manifest(root / "data")["classes"]])


@pytest.mark.parametrize("command", ["eval", "predict"])
def test_an_empty_split_is_named_as_empty(empty_test_split, command, capsys):
    """It said "0 samples make no batch of 256 ... with drop_last=True", which both never set."""
    data, ckpt = empty_test_split
    main = eval_cmd.main if command == "eval" else predict_cmd.main
    assert main(["--ckpt", str(ckpt), "--data", str(data), "--split", "test", "--device", "cpu"]) == 2
    line = error_line(capsys.readouterr().err, f"the test split of {data} is empty")
    assert "drop_last" not in line


def test_the_sampler_says_a_split_is_empty_whatever_drop_last_says():
    from fasttin.loaders.errors import LoaderArgumentError
    from fasttin.loaders.sampler import EpochSampler
    for drop_last in (False, True):
        with pytest.raises(LoaderArgumentError, match="empty") as e:
            EpochSampler(0, 256, shuffle=False, drop_last=drop_last, seed=0, rank=0, world_size=1, augment="none")
        assert "drop_last" not in str(e.value)


# ---- SIGTERM ---------------------------------------------------------------------------------------------

# `python -c BLOCKED MODULE FUNCTION args...`: the command, with FUNCTION (its work) replaced by one
# that says "working" and waits for a signal: the test signals it at that point, not at a moment
BLOCKED = """
import importlib, signal, sys
mod = importlib.import_module(sys.argv[1])
def blocked(*a, **k):
    print("working", file=sys.stderr, flush=True)
    while True:
        signal.pause()
setattr(mod, sys.argv[2], blocked)
sys.exit(mod.main(sys.argv[3:]))
"""


@pytest.mark.parametrize("command", ["eval", "predict"])
def test_sigterm_stops_eval_and_predict_as_interrupted(inputs, tmp_path, command):
    """SIGTERM (kill, timeout, Slurm) exited 143 with no word; the exit-code table says 130."""
    out = tmp_path / "out.json"
    args = (["fasttin.eval", "evaluate", "--data", inputs["data"], "--json", out] if command == "eval" else
            ["fasttin.predict", "top5", inputs["root"] / "a.png", "--csv", out])
    proc = subprocess.Popen([sys.executable, "-c", BLOCKED, *map(str, args), "--ckpt", str(inputs["good"]),
                             "--device", "cpu"], cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    lines = Lines(proc.stderr)
    try:
        lines.wait("working", proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 130
    finally:
        proc.kill()
    error_line(lines.text().replace("working\n", ""), f"fasttin.{command}: interrupted")
    assert not out.exists() and not list(tmp_path.iterdir())


def test_predict_split_without_csv_prints_its_predictions(inputs, capsys):
    """They were computed and thrown away (exit 0, nothing printed)."""
    rc = predict_cmd.main(["--ckpt", str(inputs["good"]), "--split", "test", "--data", str(inputs["data"]),
                           "--device", "cpu"])
    out, err = capsys.readouterr()
    rows = list(csv.reader(io.StringIO(out)))
    assert rc == 0 and err == "" and rows[0][0] == "file"
    assert len(rows) == 1 + read_manifest(inputs["data"])["splits"]["test"]["count"]
