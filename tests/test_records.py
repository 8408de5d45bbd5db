"""The run records and what is built from them: the commit they name, the ablation rows and the
figure of top-1 against minutes, and the README's results table, filled only from the records."""
import contextlib
import json
import re
import zipfile
from pathlib import Path

import pytest
from helpers import ROOT

from fasttin.recipes import RECIPES, WRITEUP_TOP1

RUNS = ROOT / "benchmarks" / "results" / "runs"


def test_records_name_the_commit_they_ran():
    """config.json and every benchmark record carry fasttin.info.environment(): its commit is what
    lets anyone re-run a record (a '-dirty' suffix says the checkout had uncommitted changes)."""
    import subprocess

    from fasttin.info import environment
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    assert environment()["commit"] in (head.stdout.strip(), head.stdout.strip() + "-dirty")


def test_records_name_the_cpu_with_its_model_and_simd_flags():
    """A shared machine may be another CPU another day: the record says which, from /proc/cpuinfo."""
    from fasttin.info import cpu_model
    info = ("processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 143\n"
            "model name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: fpu sse avx2 avx512f amx_tile\n\n"
            "processor\t: 1\nmodel name\t: another\n")
    assert cpu_model(info) == "Intel(R) Xeon(R) Platinum 8480+ (family 6, model 143; avx2 avx512f amx_tile)"
    assert cpu_model("processor\t: 0\nmodel name\t: Old\nflags\t: fpu sse2\n") == "Old (family ?, model ?)"
    assert cpu_model("") and "model name" not in cpu_model("")  # no /proc/cpuinfo: platform's word


def test_time_to_accuracy_compares_runs_and_refuses_an_empty_one(tmp_path):
    """The ablation table's rows and the figure come from run folders: a row names only the settings
    where its run differs from the first, the minutes add up each epoch's time, and a run with no
    epoch yet is one line naming it, not a crash."""
    import subprocess
    import sys

    from helpers import refused

    def run_folder(name, rows, **cfg):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"recipe": "fast-cpu", "epochs": 2, "lr": 0.2, "ema": 0.999, **cfg}))
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return d

    def row(epoch, acc, ema, s):
        return {"epoch": epoch, "val_acc1": acc, "ema_val_acc1": ema, "val_acc5": acc + 0.2, "epoch_s": s,
                "lr": 0.1, "res": 64, "train_img_s": 100.0}
    full = run_folder("full", [row(1, 0.20, 0.25, 60.0), row(2, 0.30, 0.33, 90.0)])
    low = run_folder("lr", [row(1, 0.10, 0.12, 60.0), row(2, 0.27, 0.26, 30.0)], lr=0.1)
    tool = [sys.executable, str(ROOT / "tools" / "time_to_accuracy.py")]
    r = subprocess.run([*tool, "--compare", "--out", str(tmp_path / "f.png"), str(full), str(low)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "| full | - | 30.0% | 30.0% | 33.0% | 2.5 |" in r.stdout
    assert "| lr | lr 0.1 | 27.0% | 27.0% | 26.0% | 1.5 |" in r.stdout
    assert (tmp_path / "f.png").stat().st_size > 0
    empty = run_folder("empty", [])
    r = subprocess.run([*tool, "--out", str(tmp_path / "g.png"), str(full), str(empty)],
                       capture_output=True, text=True, cwd=ROOT)
    refused(r, 2, str(empty), "no epoch")
    assert not (tmp_path / "g.png").exists()



def test_the_readme_results_table_comes_from_the_records():
    """Each recipe row of the README names a real recipe and the write-up's own figure; each figure in
    the 'fasttin, 200 classes, CPU' and 'GPU' columns is its record's (runs/<recipe>-cpu, -h200) best
    top-1 and minutes (the sum of its epochs), so a re-run record or an edited table that disagree
    fail here."""
    results = (ROOT / "README.md").read_text().split("## Results", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1:-1] for line in results.splitlines() if line.startswith("| `")]
    assert len(rows) >= len(WRITEUP_TOP1)
    cells_of = {"cpu": 0, "h200": 0}
    for cells in rows:
        name = cells[0].strip().strip("`")
        assert name in RECIPES, name
        if name in WRITEUP_TOP1:
            assert cells[2].strip() == f"{WRITEUP_TOP1[name]:.1%}", name
        for column, machine in ((3, "cpu"), (4, "h200")):
            figure = re.match(r"\s*\*\*([\d.]+)%\*\* in ([\d.]+) min \((\d+) epochs\)", cells[column])
            if figure is not None:
                check_figure(RUNS / f"{name}-{machine}", name, figure)
                cells_of[machine] += 1
    assert cells_of["cpu"] >= 2 and cells_of["h200"] >= 1  # seed-64-scratch and fast-cpu; fast


def check_figure(record, name, figure):
    """One results cell against its run record: best top-1, minutes, epochs, and the 'past X% at Y
    min' that may follow (the first epoch whose raw or EMA top-1 reaches X, its minutes so far)."""
    summary = json.loads((record / "summary.json").read_text())
    epochs = [json.loads(x) for x in (record / "metrics.jsonl").read_text().splitlines()]
    assert json.loads((record / "config.json").read_text())["recipe"] == name
    assert float(figure[1]) == round(100 * summary["best_val_acc1"], 1), name
    assert float(figure[2]) == round(sum(r["epoch_s"] for r in epochs) / 60, 1), name
    assert int(figure[3]) == len(epochs) == summary["epochs"], name
    past = re.match(r"; (?:past|reached) ([\d.]+)% at ([\d.]+) min", figure.string[figure.end():])
    if past is not None:
        top1 = [max(r["val_acc1"], r.get("ema_val_acc1") or 0) for r in epochs]
        first = next(i for i, acc in enumerate(top1) if round(100 * acc, 1) >= float(past[1]))
        assert float(past[2]) == round(sum(r["epoch_s"] for r in epochs[:first + 1]) / 60, 1), name


def test_readme_s_loading_ratios_are_the_peers_records():
    """The README's 2026-12-02 ranges of `resident` against FFCV raw are the min and max of the four
    peers runs kept in benchmarks/results/cpu-2026-12-02-peers/ (two of each code, alternated)."""
    runs = sorted((ROOT / "benchmarks" / "results" / "cpu-2026-12-02-peers").glob("*.json"))
    assert [p.stem for p in runs] == ["new1", "new2", "old1", "old2"]
    ratio = {64: [], 224: [], "classic": []}
    for p in runs:
        recs = {(r["backend"], r["res"]): r["img_per_s"] for r in json.loads(p.read_text())["records"]}
        for res in (64, 224):
            ratio[res].append(recs["fasttin-resident", res] / recs["ffcv-raw", res])
        ratio["classic"].append(recs["fasttin-resident", 224] / recs["classic", 224])
    readme = " ".join((ROOT / "README.md").read_text().split())
    span = {k: f"{min(v):.2f}-{max(v):.2f}" for k, v in ratio.items()}
    assert f"{span[64]}x at 64" in readme and f"{span[224]}x at 224" in readme
    assert f"{min(ratio['classic']):.1f}-{max(ratio['classic']):.1f}x the classic pipeline at 224" in readme
    after = {r["backend"]: r["img_per_s"] for r in json.loads(
        (ROOT / "benchmarks" / "results" / "cpu-2026-12-02-slices" / "peers224.json").read_text())["records"]}
    assert f"{after['fasttin-resident'] / after['ffcv-raw']:.2f}x at 224** (one run, after)" in readme
    later = {64: [], 224: []}  # 2026-12-04, another CPU, the slices in
    for p in sorted((ROOT / "benchmarks" / "results" / "cpu-2026-12-04-peers").glob("run*.json")):
        recs = {(r["backend"], r["res"]): r["img_per_s"] for r in json.loads(p.read_text())["records"]}
        for res in later:
            later[res].append(recs["fasttin-resident", res] / recs["ffcv-raw", res])
    assert len(later[64]) == 2
    assert all(f"**{min(v):.2f}-{max(v):.2f}x at {res}**" in readme for res, v in later.items())


def test_benchmarks_gpu_goals_are_the_h200_records():
    """BENCHMARKS.md's GPU goals table against the records the H200 wrote: they name the H200, every
    check with DALI passed, and each ratio and rate in the table is the JSON's."""
    gpu = ROOT / "benchmarks" / "results" / "gpu-2026-12-04-h200"
    a, b = (json.loads((gpu / f"bench-{s}.json").read_text()) for s in "AB")
    assert a["environment"]["gpu"] == b["environment"]["gpu"] == "NVIDIA H200"
    assert all(c["ok"] for c in json.loads((gpu / "checks-B.json").read_text()))
    rate = {(r["stage"], r.get("backend") or r["name"], r["res"]): r["img_per_s"] for r in a["records"] + b["records"]}
    model = {res: rate["model", "imagenet stem, bf16, NHWC, eager, batch 256, 16 thread(s)", res] for res in (64, 224)}
    text = " ".join((ROOT / "BENCHMARKS.md").read_text().split("## GPU", 1)[1].split("### Runbook", 1)[0].split())
    for res in (64, 224):
        for loader, fmt in (("resident", ".1f"), ("dali", ".2f")):
            got = rate["loader", loader, res]
            assert f"{got:,.0f} = **{got / model[res]:{fmt}}x" in text, (loader, res)
        assert f"**{rate['train', 'resident', res] / model[res]:.2f}** at {res}" in text
    assert f"**{100_000 / rate['train', 'resident', 224]:.1f} s** of training" in text  # the 224 epoch estimate
    rows = [json.loads(x) for x in (RUNS / "fast-h200" / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in rows if r["val_acc1"] >= 0.6)
    assert f"**{first['val_acc1']:.1%} after {first['elapsed_s']:.0f} s** of training (epoch {first['epoch']}" in text


def load_tool(name: str):
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_the_pack_ratio_tool_takes_turns(monkeypatch, capsys, tmp_path):
    """tools/pack_ratio.py times the read loop and the pack each going first in turn (ABBA), as
    every alternation here does (runner.rotation), not always in one order."""
    tool = load_tool("pack_ratio")
    calls = []
    monkeypatch.setattr(tool, "read_loop", lambda path: calls.append("read"))
    monkeypatch.setattr(tool, "pack", lambda src, out, quiet: calls.append("pack"))
    zipfile.ZipFile(tmp_path / "archive.zip", "w").close()
    assert tool.main([str(tmp_path / "archive.zip"), "--repeats", "3"]) == 0
    assert calls == ["read", "pack", "pack", "read", "read", "pack"]
    assert "ratio" in capsys.readouterr().out


@pytest.mark.parametrize("name, argv, culprit", [
    ("pack_ratio", ["{tmp}/missing.zip"], "missing.zip"), ("pack_ratio", ["{tmp}", "--repeats", "0"], "--repeats"),
    ("bicubic_mae", ["{tmp}/nopack"], "nopack"), ("bicubic_mae", ["{tmp}", "--res", "8"], "--res"),
    ("bicubic_mae", ["{tmp}", "--n", "-1"], "--n")])
def test_the_measuring_tools_refuse_bad_input_in_one_line(name, argv, culprit, tmp_path, capsys):
    with pytest.raises(SystemExit) if culprit.startswith("--") else contextlib.nullcontext() as stop:
        rc = load_tool(name).main([a.format(tmp=tmp_path) for a in argv])
    assert (stop.value.code if stop else rc) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"tools.{name}: error: ") and culprit in err[0], err


@pytest.mark.parametrize("folder", ["cpu-2026-12-04-pipe-and-one-timing-path",
                                    "cpu-2026-12-04-one-classic-builder", "cpu-2026-12-05-worker-timeout",
                                    "cpu-2026-12-05-trim"])
def test_benchmarks_before_and_after_tables_are_their_records(folder):
    """The peers and loader tables of a BENCHMARKS.md before/after section, rebuilt from the JSON
    kept beside it: an edited figure, or a record that is not the one quoted, fails."""
    folder = ROOT / "benchmarks" / "results" / folder
    recs = {p.stem: {(r["res"], r["backend"]): r for r in json.loads(p.read_text())["records"]}
            for p in folder.glob("*.json")}
    assert len(recs) == 8, sorted(recs)
    text = (ROOT / "BENCHMARKS.md").read_text()
    runs = ("old", "new", "old2", "new2")
    for (res, peer), r in recs["peers-old"].items():
        if r["img_per_s"]:
            rates = [recs[f"peers-{k}"][res, peer]["img_per_s"] for k in runs]
            ffcv = [recs[f"peers-{k}"][res, "ffcv-raw"]["img_per_s"] for k in runs]
            row = (f"| {peer} | {res} | " + " | ".join(f"{x:,.0f}" for x in rates) + " | "
                   + " | ".join(f"{x / f:.2f}x" for x, f in zip(rates, ffcv)) + f" | {r['mae_vs_pil']:.2f} |")
            assert row in text and recs["peers-new"][res, peer]["mae_vs_pil"] == r["mae_vs_pil"], row
    for k in ("old", "new", "new2", "old2"):
        row = f"| {k} | " + " | ".join(f"{r['img_per_s']:,.0f}" for r in recs[f"loader-{k}"].values()) + " |"
        assert row in text, row


def test_the_trim_sections_side_runs_are_their_records():
    """The first loader comparison's table and the six DALI runs quoted in the trim section."""
    folder = ROOT / "benchmarks" / "results" / "cpu-2026-12-05-trim"
    text = (ROOT / "BENCHMARKS.md").read_text()
    for k in ("old", "new", "new2", "old2"):
        recs = json.loads((folder / "first-loader-run" / f"loader-{k}.json").read_text())["records"]
        assert f"| {k} | " + " | ".join(f"{r['img_per_s']:,.0f}" for r in recs) + " |" in text, k
    dali = {p.stem: next(r["img_per_s"] for r in json.loads(p.read_text())["records"] if r["backend"] == "dali")
            for p in (folder / "dali64").glob("*.json")}
    assert len(dali) == 6
    for side, name in (("o", "old"), ("n", "new")):
        runs = [dali[f"d64-{side}{i}"] for i in (1, 2, 3)]
        assert f"{name} " + " / ".join(f"{x:,.0f}" for x in runs) in text.replace("\n", " ")
        assert f"{sum(runs) / 3:,.0f}" in text


AVX2_RESULTS = ROOT / "benchmarks" / "results" / "cpu-2026-12-07-avx2"
ZEN3_RESULTS = ROOT / "benchmarks" / "results" / "cpu-2026-12-07-zen3-avx2"


def model_rates(name: str, folder: Path = AVX2_RESULTS) -> dict:
    """{(precision, layout, res, batch): img/s} of a model-stage record's eager 2-thread points."""
    out = {}
    for r in json.loads((folder / name).read_text())["records"]:
        if r["stage"] == "model" and r["img_per_s"] and r.get("threads", 2) == 2 and "eager" in r["name"]:
            precision, layout = r["name"].split(", ")[1:3]
            out[precision, layout, r["res"], r["batch_size"]] = r["img_per_s"]
    return out


def test_the_cpu_step_figures_fasttin_quotes_are_its_records():
    """The slowdown quoted when bf16 is refused without bf16 instructions (both AVX2 CPUs measured),
    and NHWC's speed against NCHW's quoted for the layout (every CPU's step table at batch 64-256)."""
    from fasttin import tuning
    real = model_rates("step-avx2.json", ZEN3_RESULTS)
    slow = [t["fp32", "NHWC", 64, b] / t["bf16", "NHWC", 64, b] for t in (model_rates("step-avx2.json"), real)
            for b in (100, 128, 256)]
    assert tuning.NO_BF16_SLOWDOWN == f"{min(slow):.1f}-{max(slow):.1f}x"
    tables = [model_rates(n) for n in ("step-avx512-1.json", "step-avx512-2.json", "step-avx2.json")]
    tables += [real, model_rates("cpu-2026-12-02-step.json", ROOT / "benchmarks" / "results")]
    for precision in ("fp32", "bf16"):
        gain = [t[precision, "NHWC", 64, b] / t[precision, "NCHW", 64, b] for t in tables for b in (64, 100, 128, 256)
                if (precision, "NCHW", 64, b) in t]
        assert len(gain) == 16 and tuning.NHWC_GAIN[precision] == f"{min(gain):.2f}-{max(gain):.2f}x", precision
    text = (ROOT / "BENCHMARKS.md").read_text()
    for precision in ("fp32", "bf16"):
        for layout in ("NCHW", "NHWC"):
            cells = " | ".join(f"{real[precision, layout, 64, b]:.1f}" for b in (100, 128, 256))
            assert f"| {precision}, {layout} | {cells} |" in text, (precision, layout)


def test_the_avx2_step_tables_and_the_figures_quoted_from_them_are_their_records():
    """BENCHMARKS.md's AVX2 section, rebuilt from its JSON."""
    a1, a2, v = (model_rates(f"{n}.json") for n in ("step-avx512-1", "step-avx512-2", "step-avx2"))
    res = model_rates("step-avx2-res.json")
    text = (ROOT / "BENCHMARKS.md").read_text()

    def f(x):
        return f"{x:,.1f}" if x < 100 else f"{x:,.0f}"
    for precision in ("fp32", "bf16"):
        for layout in ("NCHW", "NHWC"):
            cells = [f"{a1[precision, layout, 64, b]:,.0f} / {a2[precision, layout, 64, b]:,.0f}"
                     for b in (100, 128, 256)]
            cells += [f(v[precision, layout, 64, b]) for b in (100, 128, 256)]
            assert f"| {precision}, {layout} | " + " | ".join(cells) + " |" in text, (precision, layout)
            row = [v[precision, layout, 64, 128]] + [res[precision, layout, r, 128] for r in (80, 96)]
            line = (f"| {precision}, {layout} | " + " | ".join(f(x) for x in row) + " | "
                    + " | ".join(f"{row[0] / x:.2f}x" for x in row[1:]) + " |")
            assert line in text, line


def test_what_fasttin_tells_a_cpu_user_is_the_records():
    """The CPU figures fasttin prints (tuning.FAST_CPU_ON, SEED_224_EPOCH_ON) against the runs they
    come from, the AVX2 estimate recomputed; docs/COMMANDS.md shows the lines the code prints."""
    from fasttin import machine, tuning
    bf16 = [json.loads(x) for x in (RUNS / "fast-cpu-cpu" / "metrics.jsonl").read_text().splitlines()]
    (first,) = [json.loads(x) for x in (RUNS / "fast-cpu-avx2-epoch1" / "metrics.jsonl").read_text().splitlines()]
    assert json.loads((RUNS / "fast-cpu-avx2-epoch1" / "config.json").read_text())["amp"] == "off"
    best = round(100 * max(r["val_acc1"] for r in bf16), 1)
    minutes = round(sum(r["epoch_s"] for r in bf16) / 60)
    for kind in ("bf16", "off"):
        assert f"{best}% val top-1 in {minutes} min" in tuning.FAST_CPU_ON[kind]
    v, res = model_rates("step-avx2.json"), model_rates("step-avx2-res.json")
    cost = {r: v["fp32", "NHWC", 64, 128] / res["fp32", "NHWC", r, 128] for r in (80, 96)}
    scaled = first["epoch_s"] - first["checkpoint_s"]
    total = 4 * first["epoch_s"] + sum(3 * (scaled * cost[r] + first["checkpoint_s"]) for r in (80, 96))
    off = tuning.FAST_CPU_ON["off"]
    assert f"an estimated {total / 3600:.1f} h" in off and f"{first['epoch_s'] / 60:.1f} min" in off
    assert f"{100 * first['val_acc1']:.1f}% top-1 against bf16's {100 * bf16[0]['val_acc1']:.1f}%" in off
    assert f"about {10 * first['epoch_s'] / 60:.0f} min with --res-schedule none" in off
    for kind, log in (("bf16", "seed-224-bf16-avx512.log"), ("off", "seed-224-fp32-avx2.log")):
        rate = re.search(r"measured (\d+) img/s .*: about (.+?) of training an epoch", (AVX2_RESULTS / log).read_text())
        assert tuning.SEED_224_EPOCH_ON[kind].startswith(f"about {rate[2]} (") and f"{rate[1]} img/s" in \
            tuning.SEED_224_EPOCH_ON[kind], kind
    avx2 = machine.CpuSupport(isa="AVX2", bf16="none", cores=2)
    commands = (ROOT / "docs" / "COMMANDS.md").read_text()
    assert tuning.main_job_note(avx2) in commands
    assert tuning.choose("bf16", True, "cpu", support=avx2, threads=False).warnings[0] in commands
