"""The settings whose fastest value depends on the machine: autocast precision (`amp`), the memory
layout (`channels_last`) and, on the CPU, torch's thread count. A value the user gave is kept
(with one line where it is slow here); one left out ("auto", or no --[no-]channels-last) is chosen
for the device at hand and recorded with the reason:

- a CUDA device: bf16 where it has bf16 units (compute capability 8.0 on), else fp16 with the
  gradient scaler; channels_last (the tensor cores' layout);
- a CPU, by what it supports (`machine.cpu_support`): no fast bf16 kernels (AVX2 and below): fp32;
  bf16 instructions (AVX512-BF16, AMX-BF16, aarch64 BF16): bf16 on channels_last, the layout of
  oneDNN's bf16 kernels. Where support does not settle it (the layout in fp32; bf16 emulated on
  AVX-512 without bf16 instructions) a probe decides: a few steps of the real training step per
  candidate, alternated, seconds in all, cached per machine, torch and thread count in
  `fileio.cache_folder()/cpu-probe.json` (a damaged cache is ignored and measured again);
- threads: torch's default, within the cores this process may use (affinity, container quota);
  OMP_NUM_THREADS, when set, is the user's choice.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from fasttin import machine
from fasttin.errors import UserError
from fasttin.fileio import cache_folder, write_json_atomic
from fasttin.recipes import AUTO

PROBE = dict(res=64, batch=32, rounds=3, stem="imagenet")  # the probe's step: standard stem, 64 px
MARGIN = 1.05  # a probed candidate beats the preferred one only when this much faster (the probe is noisy)
CACHE_NAME, CACHE_FORMAT, CACHE_MAX_BYTES = "cpu-probe.json", "fasttin-cpu-probe/1", 1 << 20
# measured, BENCHMARKS.md "The CPU step on AVX2": bf16 autocast against fp32 where oneDNN has no bf16 kernels
NO_BF16_SLOWDOWN = "11.5-15.7x"
# measured, the same section: NHWC's speed against NCHW's at batch 64-256, on every CPU measured
NHWC_GAIN = {"fp32": "0.95-1.34x", "bf16": "1.09-2.65x"}


@dataclass
class Decision:
    """The values chosen (`values`: amp, channels_last), why each setting has its value (`why`, as
    config.json records it), and a line for each given value that is slow here (`warnings`)."""

    values: dict = field(default_factory=dict)
    why: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)


def layout(channels_last: bool) -> str:
    return "NHWC" if channels_last else "NCHW"


def precision(amp: str) -> str:
    return "fp32" if amp == "off" else amp


def candidate(amp: str, channels_last: bool) -> str:
    return f"{precision(amp)} {layout(channels_last)}"


# ---- the choice ------------------------------------------------------------------------------------

def choose(amp: str, channels_last: bool | None, device, *, support: machine.CpuSupport | None = None,
           probe=None, log=None, threads: bool = True) -> Decision:
    """amp ("auto" or a precision) and channels_last (None: choose) for `device`; on the CPU also
    torch's threads (unless `threads` is False). `probe(candidates) -> {name: img/s}` replaces the
    real probe (tests); `log` gets the probe's one line."""
    import torch
    device = torch.device(device)
    if device.type == "cuda":
        return _choose_cuda(amp, channels_last, device)
    d = Decision()
    if threads:
        d.why["threads"], warning = set_threads(support.cores if support else None)
        d.warnings += [warning] if warning else []
    s = support or machine.cpu_support()
    amps = [amp] if amp != AUTO else {"none": ["off"], "native": ["bf16"]}.get(s.bf16, ["bf16", "off"])
    # NHWC unless given: the faster layout on every CPU measured; a probe of a few steps at a small
    # batch misjudged it (BENCHMARKS.md), so only an emulated bf16 against fp32 is probed
    layouts = [channels_last] if channels_last is not None else [True]
    measured = {}
    if len(amps) * len(layouts) > 1:
        measured = measure([(a, c) for a in amps for c in layouts], s, probe=probe, log=log)
        best = max(measured, key=measured.get)
        first = candidate(amps[0], layouts[0])
        pick = first if measured[best] < MARGIN * measured[first] else best
        chosen_amp = next(a for a in amps if precision(a) == pick.split()[0])
        chosen_cl = pick.split()[1] == "NHWC"
    else:
        chosen_amp, chosen_cl = amps[0], layouts[0]
    d.values = {"amp": chosen_amp, "channels_last": chosen_cl}
    d.why["amp"] = _amp_why(amp, chosen_amp, s, measured)
    d.why["channels_last"] = _layout_why(channels_last, chosen_cl, chosen_amp)
    d.warnings += _cpu_warnings(amp, channels_last, chosen_amp, s)
    return d


def choose_ranks(cfg: dict, device, *, rank: int = 0, world: int = 1, log=None) -> Decision:
    """`choose` for a run's settings, on rank 0, the same decision on every rank (under torchrun each
    rank sets its own threads); rank 0 logs the probe and the warnings."""
    decision = choose(cfg["amp"], cfg["channels_last"], device, log=log) if rank == 0 else None
    if world > 1:
        import torch.distributed as dist
        box = [decision]
        dist.broadcast_object_list(box, src=0)
        decision = box[0]
        if rank != 0:
            set_threads()
    for line in decision.warnings if rank == 0 and log else ():
        log(line)
    return decision


def _choose_cuda(amp: str, channels_last: bool | None, device) -> Decision:
    import torch
    name = torch.cuda.get_device_name(device)
    cc = "{}.{}".format(*torch.cuda.get_device_capability(device))
    bf16 = machine.cuda_bf16(device)
    d = Decision(values={"amp": amp if amp != AUTO else "bf16" if bf16 else "fp16",
                         "channels_last": True if channels_last is None else channels_last})
    if amp != AUTO:
        d.why["amp"] = f"{precision(amp)}: given"
    elif bf16:
        d.why["amp"] = f"bf16: {name} (compute capability {cc}) computes bf16 on its tensor cores"
    else:
        d.why["amp"] = f"fp16: {name} (compute capability {cc}) has no bf16 units; fp16 with a gradient scaler"
    d.why["channels_last"] = ("channels_last: the tensor cores' layout" if channels_last is None
                              else f"{layout(channels_last)}: given")
    if amp == "bf16" and not bf16:
        d.warnings.append(f"--amp bf16: {name} (compute capability {cc}) has no bf16 units and emulates it, slowly; "
                          "--amp fp16 is its fast precision; honoured")
    return d


def _amp_why(given: str, amp: str, s: machine.CpuSupport, measured: dict) -> str:
    if given != AUTO:
        return f"{precision(amp)}: given"
    if s.bf16 == "none":
        return (f"off: this CPU has no bf16 instructions ({s.isa}), where bf16 ran {NO_BF16_SLOWDOWN} slower "
                "than fp32 (BENCHMARKS.md)")
    if s.bf16 == "native":
        return f"bf16: this CPU has bf16 instructions ({s.label})"
    return f"{precision(amp)}: this CPU emulates bf16 ({s.isa} without bf16 instructions); " + _figures(measured)


def _layout_why(given, channels_last: bool, amp: str) -> str:
    if given is not None:
        return f"{layout(channels_last)}: given"
    return f"NHWC: {_nhwc_evidence(amp)}"


def _nhwc_evidence(amp: str) -> str:
    p = precision(amp)
    if p not in NHWC_GAIN:
        return "the layout of the CPU's reduced-precision kernels (oneDNN's blocked NHWC)"
    return f"{NHWC_GAIN[p]} NCHW's speed in {p} on every CPU measured, batch 64-256 (BENCHMARKS.md)"


def _figures(measured: dict) -> str:
    return "measured " + ", ".join(f"{k} {v:,.0f} img/s" for k, v in measured.items()) + " (the CPU probe)"


def _cpu_warnings(given_amp: str, given_cl, amp: str, s: machine.CpuSupport) -> list[str]:
    """A line for each given value that is slow on this CPU, by its support or a probe cached earlier."""
    out = []
    if given_amp == "bf16" and s.bf16 == "none":
        out.append(f"--amp bf16: this CPU has no bf16 instructions ({s.isa}), where bf16 ran {NO_BF16_SLOWDOWN} "
                   "slower than fp32 (BENCHMARKS.md); honoured (leave --amp out, or --amp off, for fp32)")
    if given_amp == "fp16" and not s.fp16:
        out.append(f"--amp fp16: this CPU has no fp16 instructions ({s.label}); fp16 autocast is emulated here and "
                   "slow; honoured")
    if given_amp == "off" and s.bf16 == "native":
        out.append(f"--amp off: this CPU has bf16 instructions ({s.label}), faster than fp32 (BENCHMARKS.md); "
                   "honoured")
    if given_cl is False and precision(amp) == "bf16":  # in fp32 NCHW was within 5% of NHWC on one CPU
        out.append(f"--no-channels-last: NHWC ran {_nhwc_evidence(amp)}; honoured")
    return out


def set_threads(cores: int | None = None) -> tuple[str, str | None]:
    """(why torch has its thread count, a warning or None); lowers it to the `cores` this process
    may use (default: machine.usable_cores())."""
    import torch
    cores = cores or machine.usable_cores()
    n = torch.get_num_threads()
    given = os.environ.get("OMP_NUM_THREADS")
    if given:
        warning = (f"OMP_NUM_THREADS={given}: {n} threads on the {cores} core(s) this process may use contend; "
                   "honoured") if n > cores else None
        return f"{n}: OMP_NUM_THREADS={given}", warning
    if n > cores:
        torch.set_num_threads(cores)
        return f"{cores}: the cores this process may use (torch's default was {n})", None
    return f"{n}: torch's default, within the {cores} core(s) this process may use", None


def faster(cfg: dict, device, support: machine.CpuSupport | None = None) -> list[str]:
    """The flags that would make this run's step faster on `device`, as its support and any cached
    probe say: what the verdict may advise (never a setting that is slower here)."""
    import torch
    device = torch.device(device)
    amp, cl = cfg["amp"], cfg["channels_last"]
    if device.type == "cuda":
        tips = [("--amp bf16", amp == "off" and machine.cuda_bf16(device)), ("--channels-last", cl is False),
                ("--compile", not cfg.get("compile"))]
        return [t for t, on in tips if on]
    s = support or machine.cpu_support()
    cached = cached_figures(s)
    tips = []
    if amp == "off" and (s.bf16 == "native" or cached.get(candidate("bf16", cl), 0) > MARGIN * cached.get(
            candidate("off", cl), math.inf)):
        tips.append("--amp bf16")
    if cl is False and amp == "bf16":  # in bf16 NHWC was faster on every CPU measured; in fp32 not on all
        tips.append("--channels-last")
    return tips


# ---- the probe and its cache -----------------------------------------------------------------------

def cache_key(s: machine.CpuSupport) -> str:
    """What the probe's figures hold for: this CPU, torch, the ISA caps in force and the threads."""
    import torch

    from fasttin.info import cpu_model
    caps = "/".join(os.environ.get(k, "-") for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA"))
    return f"{cpu_model()} | torch {torch.__version__} | {s.label} | caps {caps} | {torch.get_num_threads()} threads"


def _read_cache(path: Path) -> dict:
    """The cache's entries; {} for a missing, oversized, unreadable or malformed file (it is then
    measured again and rewritten)."""
    try:
        if path.stat().st_size > CACHE_MAX_BYTES:
            return {}
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    entries = data.get("entries") if isinstance(data, dict) and data.get("format") == CACHE_FORMAT else None
    if not isinstance(entries, dict):
        return {}
    return {k: v for k, v in entries.items() if isinstance(v, dict) and _figures_ok(v.get("img_s"))}


def _figures_ok(figures) -> bool:
    return isinstance(figures, dict) and bool(figures) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
        for v in figures.values())


def cached_figures(s: machine.CpuSupport) -> dict:
    """The probe's img/s per candidate cached for this machine ({} where none)."""
    entry = _read_cache(cache_folder() / CACHE_NAME).get(cache_key(s))
    return dict(entry["img_s"]) if entry else {}


@contextlib.contextmanager
def _locked(folder: Path):
    """One process probes at a time (two would measure each other); no lock where the folder
    cannot be made (the probe then runs uncached)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        f = open(folder / "cpu-probe.lock", "a")
    except OSError:
        yield False
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield True


def measure(candidates: list[tuple[str, bool]], s: machine.CpuSupport, *, probe=None, log=None) -> dict:
    """{candidate name: img/s} for (amp, channels_last) `candidates`, from the cache where it has
    them all, else probed (and cached)."""
    names = [candidate(a, c) for a, c in candidates]
    folder = cache_folder()
    path = folder / CACHE_NAME
    with _locked(folder) as locked:
        entries, key = _read_cache(path), cache_key(s)
        have = entries.get(key, {}).get("img_s", {})
        if all(n in have for n in names):
            return {n: have[n] for n in names}
        t0 = time.perf_counter()
        figures = (probe or run_probe)(candidates)
        spent = time.perf_counter() - t0
        entries[key] = {"img_s": {**have, **figures}, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                        "probe": PROBE}
        where = f"cached in {path}" if locked else f"not cached: {folder} cannot be made or written"
        if locked:
            try:
                write_json_atomic(path, {"format": CACHE_FORMAT, "entries": entries})
            except UserError as e:
                where = f"not cached ({e})"
        if log:
            log(f"CPU probe ({spent:.1f} s, once per machine; {where}): {_figures(figures).removeprefix('measured ')}")
        return {n: figures[n] for n in names}


def run_probe(candidates: list[tuple[str, bool]]) -> dict:
    """The trainer's own step (fasttin.loop) on one random batch per candidate: a warm-up step each,
    then `rounds` timed steps each, in turn, so that a drift of the machine reaches them all; the
    median step of each as img/s."""
    import torch

    from fasttin.loop import make_step
    from fasttin.model import build_model
    from fasttin.recipes import resolve
    b, res = PROBE["batch"], PROBE["res"]
    steps = {}
    for amp, cl in candidates:
        torch.manual_seed(0)
        cfg = resolve("seed-64-scratch", amp=amp, channels_last=cl, batch_size=b, stem=PROBE["stem"])
        step = make_step(build_model(200, PROBE["stem"]), cfg, device="cpu", steps_per_epoch=1000)
        x = torch.randn(b, 3, res, res).contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
        y = torch.randint(0, 200, (b,))
        step(x, y)
        steps[candidate(amp, cl)] = (step, x, y)
    times = {k: [] for k in steps}
    for _ in range(PROBE["rounds"]):
        for k, (step, x, y) in steps.items():
            t = time.perf_counter()
            step(x, y)
            times[k].append(time.perf_counter() - t)
    return {k: b / statistics.median(v) for k, v in times.items()}


# ---- what a CPU user is told -----------------------------------------------------------------------

# fast-cpu on the 200 classes on 2 cores, by what the CPU runs it in (BENCHMARKS.md; tests/test_records.py
# checks each figure against its record in benchmarks/results/runs/)
FAST_CPU_ON = {
    "bf16": "51.9% val top-1 in 72 min on a 2-core AVX512-BF16 CPU (bf16)",
    "off": "51.9% val top-1 in 72 min in bf16 on an AVX512-BF16 CPU; on a 2-core AVX2 CPU, in fp32, an estimated "
           "2.1 h (its first epoch measured: 8.3 min, 12.2% top-1 against bf16's 11.3%), or about 83 min with "
           "--res-schedule none",
}


# seed-224's training epoch on 2 cores, from the trainer's own rate line (BENCHMARKS.md, "The CPU step on AVX2")
SEED_224_EPOCH_ON = {"bf16": "about 97 min (bf16, 17 img/s on a 2-core AVX512-BF16 CPU)",
                     "off": "about 3.3 h (fp32, 8 img/s on a 2-core AVX2 CPU)"}


def cpu_kind(support: machine.CpuSupport | None = None) -> str:
    """The precision fasttin trains in on this CPU: the key of the figures above."""
    return "bf16" if (support or machine.cpu_support()).bf16 == "native" else "off"


def gpu_workload(cfg: dict) -> str | None:
    """Why the run's step is a GPU's work (None: a CPU trains it in minutes an epoch)."""
    from fasttin.recipes import max_res
    if max_res(cfg) > 96:
        return f"res {max_res(cfg)}"
    if cfg["stem"] == "cifar":
        return "the cifar stem keeps the full 64x64 maps: 16x the standard stem's activations"
    return None


def cpu_hint(cfg: dict, support: machine.CpuSupport | None = None) -> str | None:
    """One line for a run of a GPU workload on a machine with no CUDA device: what it is, and the
    CPU recipe with what it reaches on a CPU like this one (None for a CPU-sized run)."""
    why = gpu_workload(cfg)
    if why is None:
        return None
    return (f"no CUDA device: {cfg['recipe']} is a GPU workload ({why}) and will be slow here (the rate line "
            f"below says how slow); the CPU recipe is --recipe fast-cpu: {fast_cpu_here(support)}")


def fast_cpu_here(support: machine.CpuSupport | None = None) -> str:
    """What fast-cpu reaches on a CPU like this one: its bf16 record, or its fp32 estimate where bf16
    has no instructions of its own here."""
    return FAST_CPU_ON[cpu_kind(support)]


def main_job_note(support: machine.CpuSupport | None = None) -> str:
    """tools/run.sh's line on a machine without CUDA: why it trains fast-cpu, and how to get seed-224."""
    kind = cpu_kind(support)
    return (f"run.sh: no CUDA device here, and seed-224 (res 224, 7 epochs) is a GPU workload: an epoch takes "
            f"{SEED_224_EPOCH_ON[kind]} on a CPU like this one. Training the CPU recipe fast-cpu instead: "
            f"{FAST_CPU_ON[kind]}. FASTTIN_RECIPE=seed-224 tools/run.sh trains seed-224 here anyway")
