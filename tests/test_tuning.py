"""The machine-dependent settings (fasttin/tuning.py, fasttin/machine.py): chosen by what the CPU
supports, probed where that does not settle it, cached, recorded, and never advised where slower.
CPUs of each kind are mocked (CpuSupport); the real detection is checked with the ISA caps that make
this machine's kernels those of an AVX2 one."""
import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import run_cli

from fasttin import machine, tuning
from fasttin.loop import verdict

AVX2 = machine.CpuSupport(isa="AVX2", bf16="none", cores=2)
AVX512 = machine.CpuSupport(isa="AVX512", bf16="emulated", cores=2)
AVX512_BF16 = machine.CpuSupport(isa="AVX512", bf16="native", cores=2)
AMX = machine.CpuSupport(isa="AVX512", bf16="native", amx=True, cores=2)
CAPPED = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}  # this machine's kernels as on AVX2


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTTIN_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    yield tmp_path / "cache" / tuning.CACHE_NAME
    torch.set_num_threads(threads)


def fake_probe(figures, calls=None):
    def probe(candidates):
        if calls is not None:
            calls.append(list(candidates))
        return {tuning.candidate(a, c): figures[tuning.candidate(a, c)] for a, c in candidates}
    return probe


def never(candidates):
    raise AssertionError(f"probed {candidates}: support alone settles it")


def test_avx2_picks_fp32_on_nhwc_without_a_probe_and_says_why():
    d = tuning.choose("auto", None, "cpu", support=AVX2, probe=never)  # bf16 is never stepped without it
    assert d.values == {"amp": "off", "channels_last": True}
    assert d.why["amp"].startswith("off: this CPU has no bf16 instructions (AVX2)")
    assert tuning.NO_BF16_SLOWDOWN in d.why["amp"]
    assert d.why["channels_last"].startswith("NHWC: ") and tuning.NHWC_GAIN["fp32"] in d.why["channels_last"]
    assert not d.warnings


def test_the_probe_picks_emulated_bf16_only_past_its_margin(own_cache):
    close = tuning.choose("auto", None, "cpu", support=AVX512, probe=fake_probe({"bf16 NHWC": 100, "fp32 NHWC": 104}))
    assert close.values["amp"] == "bf16"  # within the probe's noise: the preferred first candidate stays
    own_cache.unlink()
    clear = tuning.choose("auto", None, "cpu", support=AVX512, probe=fake_probe({"bf16 NHWC": 100, "fp32 NHWC": 130}))
    assert clear.values["amp"] == "off" and "130" in clear.why["amp"]


@pytest.mark.parametrize("support", [AVX512_BF16, AMX], ids=["avx512-bf16", "amx"])
def test_bf16_instructions_pick_bf16_on_nhwc_without_a_probe(support):
    d = tuning.choose("auto", None, "cpu", support=support, probe=never)
    assert d.values == {"amp": "bf16", "channels_last": True}
    assert support.label in d.why["amp"] and not d.warnings


def test_emulated_bf16_is_probed_against_fp32_on_nhwc():
    calls = []
    d = tuning.choose("auto", None, "cpu", support=AVX512, probe=fake_probe({"bf16 NHWC": 90, "fp32 NHWC": 150}, calls))
    assert calls == [[("bf16", True), ("off", True)]]
    assert d.values == {"amp": "off", "channels_last": True} and "emulates bf16" in d.why["amp"]
    given = tuning.choose("auto", False, "cpu", support=AVX512, probe=fake_probe({"bf16 NCHW": 9, "fp32 NCHW": 15}))
    assert given.values == {"amp": "off", "channels_last": False}  # a given layout is the one probed


def test_an_explicit_slow_flag_is_honoured_and_warned_in_one_line():
    d = tuning.choose("bf16", None, "cpu", support=AVX2, probe=never)  # bf16 settles NHWC: no probe
    assert d.values["amp"] == "bf16" and d.why["amp"] == "bf16: given"
    (line,) = d.warnings
    assert line.startswith("--amp bf16: this CPU has no bf16 instructions (AVX2)") and "honoured" in line
    assert "\n" not in line
    assert tuning.choose("off", True, "cpu", support=AVX2, probe=never).warnings == []  # fp32 is its speed
    (line,) = tuning.choose("off", True, "cpu", support=AMX, probe=never).warnings
    assert line.startswith("--amp off: this CPU has bf16 instructions (AMX-BF16)")


def test_nchw_given_is_warned_in_bf16_only():
    """NHWC was faster in bf16 on every CPU measured; in fp32 NCHW was within 5% of it on one."""
    (line,) = tuning.choose("auto", False, "cpu", support=AVX512_BF16, probe=never).warnings
    assert line.startswith("--no-channels-last: NHWC ran") and tuning.NHWC_GAIN["bf16"] in line and "honoured" in line
    assert tuning.choose("auto", False, "cpu", support=AVX2, probe=never).warnings == []
    assert tuning.faster({"amp": "bf16", "channels_last": False, "compile": None}, "cpu", AVX512_BF16) == \
        ["--channels-last"]
    assert tuning.faster({"amp": "off", "channels_last": False, "compile": None}, "cpu", AVX2) == []


def test_the_probe_runs_once_per_machine_and_a_damaged_cache_is_measured_again(own_cache):
    calls, lines = [], []
    figures = {"bf16 NHWC": 100.0, "fp32 NHWC": 176.0}
    first = tuning.choose("auto", None, "cpu", support=AVX512, probe=fake_probe(figures, calls), log=lines.append)
    assert len(calls) == 1 and own_cache.is_file() and "cached in" in lines[0]
    again = tuning.choose("auto", None, "cpu", support=AVX512, probe=never)
    assert again.values == first.values
    for damage in ("{not json", "[]", json.dumps({"format": "other", "entries": {}}),
                   json.dumps({"format": tuning.CACHE_FORMAT, "entries": {tuning.cache_key(AVX512): {
                       "img_s": {"bf16 NHWC": "fast", "fp32 NHWC": float("nan")}}}}).replace("NaN", "1e999"),
                   "x" * (tuning.CACHE_MAX_BYTES + 1)):
        own_cache.write_text(damage)
        calls.clear()
        d = tuning.choose("auto", None, "cpu", support=AVX512, probe=fake_probe(figures, calls))
        assert len(calls) == 1 and d.values == first.values, damage[:40]
        assert json.loads(own_cache.read_text())["format"] == tuning.CACHE_FORMAT  # rewritten whole


def test_an_unwritable_cache_costs_only_the_cache(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("FASTTIN_CACHE", str(tmp_path / "file" / "cache"))  # under a file: cannot be made
    lines = []
    d = tuning.choose("auto", None, "cpu", support=AVX512, probe=fake_probe({"bf16 NHWC": 1, "fp32 NHWC": 2}),
                      log=lines.append)
    assert d.values["amp"] == "off" and "CPU probe" in lines[0] and "not cached" in lines[0]


def test_the_real_probe_alternates_its_candidates(monkeypatch):
    """A warm-up step each, then round after round of one step each, in turn."""
    import fasttin.loop
    order = []

    class Step:
        def __init__(self, name):
            self.name = name

        def __call__(self, x, y):
            order.append(self.name)

    made = iter(["A", "B"])
    monkeypatch.setattr(fasttin.loop, "make_step", lambda model, cfg, **kw: Step(next(made)))
    figures = tuning.run_probe([("off", True), ("off", False)])
    rounds = tuning.PROBE["rounds"]
    assert order == ["A", "B"] + ["A", "B"] * rounds
    assert set(figures) == {"fp32 NHWC", "fp32 NCHW"} and all(v > 0 for v in figures.values())


def test_threads_within_the_usable_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    why, warning = tuning.set_threads(1)
    assert torch.get_num_threads() == 1 and why.startswith("1: the cores this process may use") and warning is None
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    torch.set_num_threads(2)
    why, warning = tuning.set_threads(1)
    assert torch.get_num_threads() == 2 and "OMP_NUM_THREADS=2" in why and "honoured" in warning


@pytest.mark.parametrize("support, advised", [(AVX2, False), (AVX512_BF16, True), (AMX, True)])
def test_the_verdict_advises_bf16_only_where_it_is_faster(support, advised):
    cfg = {"amp": "off", "channels_last": True, "compile": None}
    tips = tuning.faster(cfg, "cpu", support)
    line = verdict({"data_wait": 0.01, "compute": 0.95}, faster=tips)
    assert ("--amp bf16" in line) is advised
    assert "--compile" not in line  # a CPU gains nothing from it (BENCHMARKS.md) and pays minutes


def test_cpu_flags_of_both_architectures():
    x86 = "processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16 amx_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n"
    arm = "processor\t: 0\nFeatures\t: fp asimd bf16\n"
    assert machine.cpu_flags(x86) == {"fpu", "avx2", "avx512_bf16", "amx_bf16"}
    assert machine.cpu_flags(arm) == {"fp", "asimd", "bf16"} and machine.cpu_flags("") == set()


def test_the_isa_caps_make_this_cpu_an_avx2_one():
    r = run_cli("fasttin.info", env=CAPPED)
    assert r.returncode == 0 and "AVX2" in r.stdout
    out = subprocess.run([sys.executable, "-c", "from fasttin import machine; s = machine.cpu_support(); "
                          "print(s.label, s.bf16)"], capture_output=True, text=True, env={**os.environ, **CAPPED})
    assert out.stdout.split() == ["AVX2", "none"], out.stderr


@pytest.mark.slow
def test_the_trainer_records_the_choice_and_warns_of_a_slow_flag(packed, tmp_path):
    """On this machine with its kernels capped to AVX2: fp32 chosen, recorded with the reason;
    an explicit --amp bf16 honoured with one line saying it is slow here."""
    quick = ["--data", packed, "--recipe", "seed-64-scratch", "--res", "32", "--epochs", "1", "--batch-size", "50",
             "--device", "cpu", "--backend", "resident", "--workers", "1"]
    env = {**CAPPED, "FASTTIN_CACHE": os.environ["FASTTIN_CACHE"]}
    r = run_cli("fasttin.train", *quick, "--out", tmp_path / "auto", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = json.loads((tmp_path / "auto" / "config.json").read_text())
    assert cfg["amp"] == "off" and cfg["chosen"]["amp"].startswith("off: this CPU has no bf16 instructions (AVX2)")
    assert set(cfg["chosen"]) == {"amp", "channels_last", "threads"}
    assert cfg["environment"]["cpu_class"] == "AVX2"
    assert "try --amp bf16" not in json.loads((tmp_path / "auto" / "summary.json").read_text())["verdict"]
    r = run_cli("fasttin.train", *quick, "--amp", "bf16", "--out", tmp_path / "given", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "given" / "config.json").read_text())["amp"] == "bf16"
    warned = [line for line in r.stderr.splitlines() if line.startswith("--amp bf16: this CPU has no bf16")]
    assert len(warned) == 1 and "honoured" in warned[0]


@pytest.mark.parametrize("recipe, over, gpu", [("seed-224", {}, True), ("fast", {}, True), ("fast-cpu", {}, False),
                                              ("seed-64-scratch", {}, False), ("fast-cpu", {"res": 128}, True)])
def test_the_cpu_hint_names_gpu_workloads_only_and_the_cpu_recipe_for_this_cpu_class(recipe, over, gpu):
    from fasttin.recipes import resolve
    line = tuning.cpu_hint(resolve(recipe, **over), AVX2)
    assert (line is not None) is gpu
    if gpu:
        assert line.startswith(f"no CUDA device: {recipe} is a GPU workload") and "--recipe fast-cpu" in line
        assert tuning.FAST_CPU_ON["off"] in line  # the fp32 record: what an AVX2 CPU runs it in
        assert tuning.FAST_CPU_ON["bf16"] in tuning.cpu_hint(resolve(recipe, **over), AVX512_BF16)


@pytest.mark.parametrize("capability, amp", [((9, 0), "bf16"), ((7, 5), "fp16")])
def test_a_gpu_gets_bf16_where_it_has_bf16_units_else_fp16(monkeypatch, capability, amp):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: capability)
    monkeypatch.setattr(machine, "cuda_bf16", lambda d: capability[0] >= 8)
    d = tuning.choose("auto", None, "cuda", probe=never)
    assert d.values == {"amp": amp, "channels_last": True} and "compute capability" in d.why["amp"]
    given = tuning.choose("bf16", None, "cuda", probe=never)
    assert given.values["amp"] == "bf16" and bool(given.warnings) is (amp == "fp16")  # no bf16 units: said
    cfg = {"amp": "off", "channels_last": True, "compile": None}
    assert ("--amp bf16" in tuning.faster(cfg, "cuda")) is (amp == "bf16") and "--compile" in tuning.faster(cfg, "cuda")
