"""benchmarks.run: every stage reports, nothing silently missing; the stage table's runner, the
writers and the early output checks."""
import hashlib
import json
import os
import shutil
import statistics
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from helpers import ROOT, run_cli

from benchmarks import pipelines, stages, training, writers
from benchmarks.run import STAGE_NAMES, main, parser
from benchmarks.runner import Bench, Skip, Stage, run_table
from fasttin.shards import FormatError, open_split
from fasttin.shards.layout import HEADER


@pytest.mark.slow
def test_quick_benchmark_yields_complete_json(tmp_path):
    r = run_cli("benchmarks.run", "--quick", "--device", "cpu", "--json", tmp_path / "b.json",
                "--markdown", tmp_path / "b.md", "--plot", tmp_path / "b.png", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads((tmp_path / "b.json").read_text())
    recs = out["records"]
    seen = {x["stage"] for x in recs}
    assert {"read", "decode", "resize", "model", "classic", "loader", "train"} <= seen
    for x in recs:
        assert {"stage", "backend", "res", "batch_size", "device", "dtype", "img_per_s", "mb_per_s",
                "repeats", "environment"} <= set(x)
        if x.get("skipped"):
            assert x["img_per_s"] is None and x["skipped"]
        else:
            assert x["img_per_s"] > 0 and x["repeats"] >= 1
    assert any(x["stage"] == "copy" and "no CUDA" in x.get("skipped", "") for x in recs)
    train = [x for x in recs if x["stage"] == "train" and not x.get("skipped")]
    assert train and all(x["recipe"] == "seed-64-scratch" and x.get("vs_model") for x in train)
    for x in train:  # the trainer's own accounting of the timed steps
        assert abs(x["data_wait_share"] + x["compute_share"] - 1) < 0.02 and x["compute_s"] > 0
    assert out["environment"]["torch"] and out["environment"]["cores"] >= 1
    assert "| stage |" in (tmp_path / "b.md").read_text()
    assert (tmp_path / "b.png").stat().st_size > 1000
    assert "res 64, " in r.stdout and "-bound: " in r.stdout  # loop.verdict's line in the summary


def test_the_cli_knows_every_stage_of_the_table_and_backends_limit_the_loader_rows():
    assert {s.stage for s in stages.table()} == set(STAGE_NAMES)
    b = fake_bench()
    b.args.augment, b.args.amp = "flip", "bf16"
    rows = [s for s in stages.table({"pil"}) if s.stage in ("loader", "classic", "train")]
    assert [p["backend"] for s in rows for p in s.points(b, 64)] == ["pil", "pil"]


def test_backends_choose_the_loaders_of_the_loader_and_train_stages(tmp_path, capsys):
    assert main(["--quick", "--stages", "loader,train", "--backends", "resident", "--json", str(tmp_path / "b.json"),
                 "--device", "cpu"]) == 0
    records = json.loads((tmp_path / "b.json").read_text())["records"]
    assert {r["stage"] for r in records} == {"loader", "train"}  # loader brings classic only when chosen
    assert {r["backend"] for r in records} == {"resident"} and all(r["img_per_s"] for r in records)
    with pytest.raises(SystemExit):
        main(["--backends", "resident,ffcv"])
    assert "unknown backends ffcv" in capsys.readouterr().err


def fake_bench(device="cpu", repeats=3, payload="raw"):
    args = SimpleNamespace(repeats=repeats, batch_size=8, chosen={"amp": "bf16", "channels_last": True})
    return Bench(args, torch.device(device), SimpleNamespace(payload=payload))


def test_missing_needs_and_skips_become_records_with_reasons():
    ran = []
    table = [
        Stage("copy", "needs a GPU", lambda b, res: ran.append(res), ("cuda",)),
        Stage("decode", "needs JPEG", lambda b: ran.append("decode"), ("jpeg",), per_res=False),
        Stage("model", "skips itself", lambda b, res: (_ for _ in ()).throw(Skip(f"not at {res}"))),
        Stage("read", "measures", lambda b, res: (lambda: 4), grid=lambda b, res: [{"res": res}]),
        Stage("train", "not selected", lambda b, res: ran.append("train")),
    ]
    recs = run_table(fake_bench(), table, {"copy", "decode", "model", "read"}, [64, 224])
    assert ran == []  # a row whose needs are missing never runs
    by = {(r["name"], r["res"]): r for r in recs}
    assert by[("needs a GPU", 64)]["skipped"] == "no CUDA device"
    assert by[("needs JPEG", None)]["skipped"] == "raw payload: nothing to decode"
    assert by[("skips itself", 224)]["skipped"] == "not at 224"
    assert by[("measures", 64)]["img_per_s"] > 0 and by[("measures", 64)]["repeats"] == 3
    assert len(recs) == 7 and not any(r["stage"] == "train" for r in recs)


def test_alternation_takes_turns_and_never_records_an_empty_repeat():
    calls = []

    def consumer(name, images):
        def run():
            calls.append(name)
            return images(len([c for c in calls if c == name]))
        return run

    table = [Stage("loader", "{backend}", lambda b, res, backend: consumer(backend, BEHAVIOUR[backend]),
                   grid=lambda b, res: [{"res": res, "backend": k} for k in BEHAVIOUR], alternate="loaders")]
    BEHAVIOUR = {"a": lambda n: 10, "b": lambda n: 0 if n == 2 else 10, "c": lambda n: 10}
    recs = run_table(fake_bench(repeats=3), table, {"loader"}, [64])
    # warm-up a, b, c; then rounds a b c, (b) c a, c a (b): each goes first in turn, and b stopped at
    # its first empty pass
    assert calls == ["a", "b", "c", "a", "b", "c", "c", "a", "c", "a"]
    by = {r["name"]: r for r in recs}
    assert by["a"]["repeats"] == 3 and by["c"]["repeats"] == 3 and by["a"]["img_per_s"] > 0
    assert by["b"]["img_per_s"] is None and "no images" in by["b"]["skipped"]


def test_mb_per_s_comes_from_a_row_s_bytes_per_image():
    table = [Stage("read", "bytes", lambda b: ((lambda: 4), {"bytes_per_image": 2e6}), per_res=False),
             Stage("read", "no bytes", lambda b: (lambda: 4), per_res=False)]
    recs = run_table(fake_bench(repeats=2), table, {"read"}, [])
    assert recs[0]["mb_per_s"] == pytest.approx(recs[0]["img_per_s"] * 2) and recs[1]["mb_per_s"] is None


def test_the_train_stage_accounts_for_its_timed_passes_only(monkeypatch):
    """The warm-up pass waits a second for its batch; the timed ones do not: the record's data
    wait must be the timed passes', not the warm-up's."""
    passes = []

    class SlowFirstPass:
        def __len__(self):
            return 1

        def __iter__(self):
            passes.append(1)
            if len(passes) == 1:
                time.sleep(1.0)  # the warm-up's workload: a slow loader's first batch
            yield torch.randn(2, 3, 16, 16), torch.tensor([0, 1])

    monkeypatch.setattr(training, "loader_for", lambda b, backend, res: SlowFirstPass())
    b = fake_bench(repeats=2)
    b.args = SimpleNamespace(repeats=2, batch_size=2, classic_batch_size=2, steps=1, recipe="seed-64-scratch",
                             chosen={"amp": "off", "channels_last": True})
    b.ds = SimpleNamespace(classes=["a", "b"], payload="raw")
    table = [Stage("train", "t", training.train_consumer, grid=lambda b, res: [{"res": res, "backend": "pil"}])]
    (rec,) = run_table(b, table, {"train"}, [16])
    assert len(passes) == 3 and rec["repeats"] == 2 and rec["steps"] == 1, rec
    assert rec["data_wait_s"] < 0.5 and rec["compute_s"] > 0, rec


def test_a_row_s_after_runs_once_its_group_is_timed_and_what_it_started_ends_with_the_resolution():
    events = []

    def row(b, res, backend):
        b.on_release(lambda: events.append(f"close {backend}@{res}"))

        def after():
            events.append(f"after {backend}")
            if backend == "b":
                raise Skip("b's worker died")
            return {"mae_vs_pil": 0.5}
        return (lambda: events.append(f"pass {backend}") or 4), {"version": "1"}, after

    table = [Stage("peers", "{backend}", row, grid=lambda b, res: [{"res": res, "backend": k} for k in "ab"],
                   alternate="peers")]
    recs = run_table(fake_bench(repeats=1), table, {"peers"}, [64, 80])
    at64 = events[:events.index("close a@64") + 1]
    assert at64 == ["pass a", "pass b", "pass a", "pass b", "after a", "after b", "close b@64", "close a@64"]
    assert [(r["res"], r.get("mae_vs_pil"), r.get("version"), r.get("skipped")) for r in recs] == [
        (64, 0.5, "1", None), (64, None, None, "b's worker died"), (80, 0.5, "1", None),
        (80, None, None, "b's worker died")]


def test_what_a_row_started_ends_when_the_run_is_interrupted():
    closed = []

    def row(b, res):
        b.on_release(lambda: closed.append(res))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_table(fake_bench(), [Stage("peers", "p", row)], {"peers"}, [64, 80])
    assert closed == [64]


def test_a_failing_writer_loses_none_of_the_others(tmp_path):
    out = {"environment": {"date": "d", "cpu": "c", "cores": 2, "gpu": None, "torch": "t", "torchvision": "v",
                           "dali": None, "pillow": "p", "pillow_simd": False, "python": "3"},
           "command": "python -m benchmarks.run", "records": [
               {"stage": "read", "name": "x", "res": None, "batch_size": 8, "device": "cpu", "img_per_s": 5.0,
                "mb_per_s": None}]}
    (tmp_path / "b.md").mkdir()  # the markdown cannot replace a folder
    paths = {"json": tmp_path / "b.json", "markdown": tmp_path / "b.md", "plot": tmp_path / "b.png"}
    failed = writers.write_outputs(paths, out)
    assert len(failed) == 1 and str(paths["markdown"]) in failed[0]
    assert json.loads(paths["json"].read_text()) == out
    assert paths["plot"].stat().st_size > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.json", "b.md", "b.png"]  # no temporary left


def test_outputs_are_checked_before_any_work(tmp_path):
    (tmp_path / "file").write_text("")
    r = run_cli("benchmarks.run", "--device", "cpu", "--json", tmp_path / "file" / "b.json", timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(tmp_path / "file" / "b.json") in lines[0], r.stderr
    assert "Traceback" not in r.stderr and "benchmarks on" not in r.stderr


def test_a_plot_without_matplotlib_is_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    """The only guard: the plot writer trusts it."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert main(["--device", "cpu", "--plot", str(tmp_path / "b.png"), "--json", str(tmp_path / "b.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "matplotlib is not installed" in err[0] and "b.png" in err[0], err
    assert list(tmp_path.iterdir()) == []  # no work, nothing written


def test_an_interrupted_run_keeps_what_it_measured(tmp_path, packed, monkeypatch, capsys):
    def interrupt(b):
        raise KeyboardInterrupt
    rows = [Stage("read", "first", lambda b: (lambda: 4), per_res=False),
            Stage("read", "second", interrupt, per_res=False)]
    monkeypatch.setattr(stages, "table", lambda backends: rows)
    path = tmp_path / "b.json"
    assert main(["--data", str(packed), "--device", "cpu", "--stages", "read", "--json", str(path)]) == 130
    out = json.loads(path.read_text())
    assert [r["name"] for r in out["records"]] == ["first"] and "interrupted" in out["incomplete"]
    assert str(path) in capsys.readouterr().err


@pytest.mark.parametrize("argv, needle", [
    (["--data", "{tmp}/missing", "--stages", "read"], "missing"),
    (["--data", "{packed}", "--split", "nope", "--stages", "read"], "nope"),
    (["--summarize", "{tmp}/none.json"], "none.json"),
    (["--summarize", "{tmp}/fieldless.json"], "fieldless.json"),  # records without the schema's fields
    (["--markdown", "{tmp}/file/b.md"], "b.md"),
    (["--json", "{tmp}/b.json", "--markdown", "{tmp}/./b.json"], "both name"),  # one would overwrite the other
    (["--data", "{packed}", "--stages", "read", "--json", "{packed}/b.json"], "lies inside the packed data set"),
    (["--data", "{packed}", "--stages", "read", "--cache", "{packed}/cache"], "lies inside the packed data set"),
])
def test_bad_input_is_one_line(argv, needle, tmp_path, packed, capsys):
    (tmp_path / "file").write_text("")
    (tmp_path / "fieldless.json").write_text('{"records": [{"stage": "train", "res": 64, "img_per_s": 5}]}')
    argv = [a.format(tmp=tmp_path, packed=packed) for a in argv]
    cache = [] if "--cache" in argv else ["--cache", str(tmp_path / "cache")]
    assert main([*argv, "--device", "cpu", *cache]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("benchmarks.run: error:") and needle in err[0], err


@pytest.mark.parametrize("flag", [["--res", "abc"], ["--stages", "read,bogus"], ["--repeats", "0"],
                                  ["--trainer-epochs", "0"], ["--batches", "-3"], ["--peer-timeout", "nan"],
                                  ["--peer-timeout", "0"], ["--augment", "bogus"]])
def test_bad_flags_are_refused_by_the_parser(flag, capsys):
    with pytest.raises(SystemExit) as e:
        main([*flag, "--device", "cpu"])
    assert e.value.code == 2
    assert flag[0] in capsys.readouterr().err


def test_comma_lists_keep_their_order_and_measure_a_repeat_once():
    args = parser().parse_args(["--res", "224,64,224", "--batch-sizes", "8,8,16", "--threads", "2,1,2"])
    assert (args.res, args.batch_sizes, args.threads) == ([224, 64], [8, 16], [2, 1])


@pytest.mark.parametrize("name", ["../escape.JPEG", "/tmp/abs.JPEG", "a/b.JPEG", "x\n.JPEG", "x\u2028.JPEG",
                                  "x\x85.JPEG", "", "..", "x" * 252 + ".JPEG"])
def test_a_hostile_sample_name_in_a_shard_never_reaches_the_cache(name, packed, tmp_path):
    """The split written out as files (the classic pipeline's, the peers') takes its names from the
    reader, which refuses a forged one (a path, a separator, a line break, over 255 bytes), even in
    a shard whose size and hash agree with its manifest: nothing is written."""
    data = tmp_path / "data"
    shutil.copytree(packed, data)
    manifest = json.loads((data / "manifest.json").read_text())
    entry = manifest["splits"]["val"]["shards"][0]
    shard = data / entry["file"]
    buf = shard.read_bytes()
    fields = list(HEADER.unpack_from(buf))
    keys = buf[fields[7]:].decode().split("\n")
    forged = buf[:fields[7]] + "\n".join([name, *keys[1:]]).encode()  # the first sample's name
    fields[8] = len(forged)  # the header's end of file, then the manifest's size and hash agree
    forged = HEADER.pack(*fields) + forged[HEADER.size:]
    shard.write_bytes(forged)
    entry.update(bytes=len(forged), sha256=hashlib.sha256(forged).hexdigest())
    (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FormatError, match=shard.name):
        pipelines.split_files(open_split(data, "val", verify=True), tmp_path / "cache", upscale=64)
    assert not (tmp_path / "cache").exists()


def test_without_opencv_every_row_that_needs_it_is_a_skip_whatever_its_stage(tmp_path, packed, packed_raw,
                                                                            monkeypatch):
    """OpenCV is an optional dependency: the classic loader and train rows and the classic peer say so,
    the other rows are measured, nothing is written to the cache (the raw split's PNG folder neither)."""
    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 now raises ImportError
    path, cache = tmp_path / "b.json", tmp_path / "cache"
    assert main(["--data", str(packed), "--device", "cpu", "--stages", "loader,train,peers", "--backends",
                 "resident,classic", "--peers", "classic", "--res", "224", "--batch-size", "8", "--repeats", "1",
                 "--batches", "1", "--steps", "1", "--cache", str(cache), "--json", str(path)]) == 0
    records = {(r["stage"], r["backend"]): r for r in json.loads(path.read_text())["records"]}
    for key in [("classic", "classic"), ("train", "classic"), ("peers", "classic")]:
        assert "OpenCV is not importable" in records[key]["skipped"] and "[bench]" in records[key]["skipped"], key
    assert records[("loader", "resident")]["img_per_s"] and records[("train", "resident")]["img_per_s"]
    with pytest.raises(Skip, match="OpenCV"):
        pipelines.split_files(open_split(packed_raw, "val"), cache)
    assert [p for p in cache.rglob("*") if p.is_file()] == []


def test_loader_workers_that_hand_out_no_batch_are_a_skip_not_a_hang(tmp_path, packed, monkeypatch):
    """A worker that drops its batch (a full /dev/shm) left the loader stage waiting forever."""
    import torchvision.datasets

    from fasttin.loaders import pil
    monkeypatch.setattr(pipelines, "WORKER_TIMEOUT_S", 1)
    monkeypatch.setattr(pil, "WORKER_TIMEOUT_S", 1)
    hang = lambda *a: time.sleep(600)  # in the forked workers, which inherit it
    monkeypatch.setattr(pil._Batches, "batch", hang)
    monkeypatch.setattr(torchvision.datasets.ImageFolder, "__getitem__", hang)
    path = tmp_path / "b.json"
    assert main(["--data", str(packed), "--device", "cpu", "--stages", "loader", "--backends", "pil,classic",
                 "--res", "64", "--batch-size", "4", "--classic-batch-size", "4", "--workers", "1", "--repeats", "1",
                 "--cache", str(tmp_path / "cache"), "--json", str(path)]) == 0
    records = {r["backend"]: r for r in json.loads(path.read_text())["records"]}
    assert set(records) == {"pil", "classic"}
    assert all("no batch for 1 s" in r["skipped"] for r in records.values()), records


@pytest.mark.slow
def test_the_agreement_times_training_runs_and_the_train_stage_over_one_train_epoch_in_turn(packed, tmp_path):
    out = tmp_path / "a.json"
    # one round after the warm-up round: four processes (the turns are test_alternation_takes_turns's)
    assert main(["--stages", "agreement", "--data", str(packed), "--res", "32", "--batch-size", "50", "--repeats", "1",
                 "--trainer-epochs", "1", "--backends", "resident", "--device", "cpu", "--json", str(out)]) == 0
    recs = {r["side"]: r for r in json.loads(out.read_text())["records"]}
    assert set(recs) == {"trainer", "stage"} and not any(r.get("skipped") for r in recs.values())
    assert all(len(r["runs"]) == 1 and min(r["runs"]) > 0 for r in recs.values())
    # the stage reads the trainer's split: one epoch of 200 train images is 4 steps (val's 50 would be 1)
    assert recs["stage"]["steps"] == recs["trainer"]["steps"] == 4
    assert recs["stage"]["vs_trainer"] == pytest.approx(recs["stage"]["img_per_s"] / recs["trainer"]["img_per_s"])


def test_the_agreement_without_a_train_split_or_a_batch_of_it_is_a_skip(packed, tmp_path):
    from benchmarks.training import agreement_consumer
    b = fake_bench()
    b.args.data = str(tmp_path / "nowhere")
    with pytest.raises(Skip, match="no train split to train on"):
        agreement_consumer(b, 64, "resident", "trainer")
    b.args.data, b.args.batch_size = str(packed), 500  # the train split holds 200 images
    with pytest.raises(Skip, match="--batch-size 500: larger than the train split"):
        agreement_consumer(b, 64, "resident", "stage")


def test_a_failing_agreement_run_is_a_skip_naming_the_command_and_its_last_words():
    from benchmarks.training import run_module
    with pytest.raises(Skip, match=r"^python -m fasttin.train exited with status 2: .*no-such-recipe"):
        run_module("fasttin.train", "--recipe", "no-such-recipe")


def test_the_accounting_stage_times_the_step_with_and_without_the_clock_in_turn(tmp_path):
    assert main(["--quick", "--stages", "accounting", "--res", "16", "--device", "cpu", "--json",
                 str(tmp_path / "acc.json")]) == 0  # --quick: 2 repeats
    recs = {r["clock"]: r for r in json.loads((tmp_path / "acc.json").read_text())["records"]}
    assert set(recs) == {"with", "without"} and all(len(r["runs"]) == 2 and r["img_per_s"] > 0 for r in recs.values())
    w, wo = recs["with"], recs["without"]
    assert w["overhead"] == pytest.approx(wo["img_per_s"] / w["img_per_s"] - 1)
    assert w["paired_overhead"] == pytest.approx(statistics.median(a / b for a, b in zip(wo["runs"], w["runs"])) - 1)


def test_an_unwritable_json_is_one_line_before_any_work(tmp_path):
    (tmp_path / "a-file").write_text("kept\n")
    r = run_cli("benchmarks.run", "--stages", "accounting", "--device", "cpu", "--json", tmp_path / "a-file" / "b.json")
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stdout == ""  # nothing was measured
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "a-file is a file" in r.stderr


def test_gpu_checks_rehearse_on_the_cpu_with_dali_hidden(learnable, tmp_path):
    """As on the bare GPU machine (no DALI): resident and pil are checked, every DALI check is a
    skip with its reason (never a pass, never a crash), and the exit code is 0."""
    hide = str(ROOT / "tools" / "hide-dali")
    r = run_cli("benchmarks.gpu_checks", "--data", learnable, "--device", "cpu", "--steps", "6", "--json",
                tmp_path / "checks.json", env={"PYTHONPATH": os.pathsep.join(filter(None, [hide, os.environ.get(
                    "PYTHONPATH")]))})
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
    out = json.loads((tmp_path / "checks.json").read_text())
    dali_checks = [c for c in out if "dali" in c["check"]]
    assert len(dali_checks) == 4 and all(c["ok"] is None and "not importable" in c["skipped"] for c in dali_checks)
    ran = [c for c in out if c not in dali_checks]
    assert {c["check"].split(" ")[0] for c in ran} == {"resident", "pil"} and all(c["ok"] for c in ran), ran
    assert r.stdout.count("skip ") == 4 and "FAIL" not in r.stdout


def test_the_model_grid_spans_precision_layout_batch_and_threads_and_compiles_once():
    """The CPU-step benchmark's grid (issue 17, part 4): every eager point at every batch size and
    thread count, the compiled one only where the trainer would run it (a compile per shape)."""
    from benchmarks import training
    b = fake_bench()
    b.args.__dict__.update(recipe="seed-64-scratch", batch_size=100, batch_sizes=[64, 100], threads=[1, 2],
                           compiled="some", stems={"imagenet"}, quick=False)
    points = training.model_grid(b, 64)
    eager = [p for p in points if not p["compile"]]
    assert len(eager) == 4 * 4 and {(p["batch_size"], p["threads"]) for p in eager} == {(64, 1), (64, 2), (100, 1),
                                                                                         (100, 2)}
    assert [(p["batch_size"], p["threads"], p["amp"]) for p in points if p["compile"]] == [
        (100, torch.get_num_threads(), "bf16")]
    assert len({training.model_label(p) for p in points}) == len(points)  # every point named apart
    b.args.compiled = "only"
    assert all(p["compile"] for p in training.model_grid(b, 64))


@pytest.mark.slow
def test_the_gpu_driver_rehearses_every_phase_on_the_cpu_and_writes_its_goal_table(tmp_path):
    """benchmarks.gpu_driver as the GPU call runs it, small, on the CPU: every phase but the compiled
    points (minutes on a CPU) done, each one's section in the JSON, the products within rounding."""
    out = tmp_path / "driver.json"
    r = run_cli("benchmarks.gpu_driver", "--device", "cpu", "--rehearse", "--json", out, "--steps", "2",
                "--repeats", "1", "--batch", "4", "--kernel-reps", "2", "--epoch-images", "400",
                "--train-per-class", "2", "--skip", "compiled")
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads(out.read_text())
    assert all(v.startswith("done") for k, v in d["phases"].items() if k != "compiled"), d["phases"]
    assert d["phases"]["compiled"] == "skipped: --skip"
    assert {(x["res"], x["augment"]) for x in d["correctness"]} == {(r, a) for r in (96, 128, 224)
                                                                    for a in ("none", "flip", "crop", "rrc")}
    assert all(x["max"] < 1e-2 for x in d["correctness"])  # float32 operands on the CPU
    assert {(x["config"], x["variant"]) for x in d["end_to_end"]} == {(c, v) for c in ("224", "64", "fast")
                                                                      for v in ("today", "products", "side")}
    assert d["epoch"]["images"] > 0 and d["checkpoint_s"]["background"] > 0 and d["profile_top"]
    assert d["goals"][0].startswith("goal |") and len(d["goals"]) == 7 and "goal | limit" in r.stdout
    bad = run_cli("benchmarks.gpu_driver", "--device", "cpu", "--json", tmp_path / "x.json", "--skip", "nope")
    assert bad.returncode != 0 and "--skip: no phase 'nope'" in bad.stderr and "Traceback" not in bad.stderr
