"""python -m benchmarks.run: images per second at every stage of the pipeline, side by side with
the classic ImageFolder pipeline, in one run on one machine.

Stages: read, decode, resize, copy (host -> device), loader (each backend), model (the compute
ceiling), train (loader + step, with its share of the ceiling), classic (ImageFolder over files
upscaled on disk). Each figure is the median of several timed repeats after a warm-up, with the
device synchronised. A stage whose needs are missing (no GPU, no DALI) is a record with `skipped`
and the reason. Loader-only figures of all backends and the classic pipeline are measured
alternately, repeat by repeat, so that they share the machine's state.
"""
from __future__ import annotations

import argparse
import gc
import io
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fasttin.fileio import write_atomic
from fasttin.info import environment
from fasttin.loaders import dali as dali_backend
from fasttin.loaders import make_loader
from fasttin.model import build_model
from fasttin.shards import open_split


class Bench:
    """Collects records; every record carries the run's shared settings."""

    def __init__(self, args, device: torch.device):
        self.args, self.device, self.records = args, device, []

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def measure(self, fn, items: int, nbytes: int = 0, repeats: int | None = None) -> dict:
        """Run fn once to warm up, then `repeats` timed calls: median images (and MB) per second."""
        repeats = repeats or self.args.repeats
        fn()
        self.sync()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t)
        med = statistics.median(times)
        return {"img_per_s": items / med, "mb_per_s": nbytes / med / 1e6 if nbytes else None, "repeats": repeats}

    def add(self, stage: str, name: str, *, res=None, device=None, dtype=None, backend=None, batch_size=None,
            skipped: str | None = None, **fields):
        rec = {"stage": stage, "name": name, "backend": backend, "res": res,
               "batch_size": batch_size or self.args.batch_size, "device": device or self.device.type,
               "dtype": dtype, "img_per_s": None, "mb_per_s": None, "repeats": 0, **fields}
        if skipped:
            rec["skipped"] = skipped
        self.records.append(rec)
        shown = f"skipped: {skipped}" if skipped else f"{rec['img_per_s']:,.0f} img/s"
        print(f"  {stage:8s} {name:38s} res {str(res or '-'):>4s}  {shown}", file=sys.stderr, flush=True)
        return rec


# ---- stages ---------------------------------------------------------------------------------------

def stage_read(b: Bench, ds):
    idx = np.arange(len(ds))
    nbytes = int(ds.payload_bytes.sum())
    read = lambda: sum(len(bytes(v)) for v in ds.encoded_batch(idx))  # noqa: E731
    b.add("read", "shard payloads, warm page cache", **b.measure(read, len(ds), nbytes))
    def cold():
        for m in ds.manifest["splits"][ds.split]["shards"]:
            fd = os.open(ds.data_dir / m["file"], os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # works for clean pages, no root needed
            os.close(fd)
        read()
    b.add("read", "shard payloads, cold (fadvise DONTNEED)", **b.measure(cold, len(ds), nbytes))


def _pil_decode(chunk):
    from PIL import Image
    ds = _pil_decode.ds
    for i in chunk:
        with Image.open(io.BytesIO(ds.encoded(i))) as im:
            im.convert("RGB").load()
    return len(chunk)


def stage_decode(b: Bench, ds, n: int):
    idx = np.arange(min(n, len(ds)))
    if ds.payload != "jpeg":
        for name in ("pillow, 1 core", "pillow, all cores", "DALI CPU", "DALI mixed (GPU)"):
            b.add("decode", name, skipped="raw payload: nothing to decode")
        return
    _pil_decode.ds = ds
    b.add("decode", "pillow, 1 core", **b.measure(lambda: _pil_decode(idx), len(idx)))
    chunks = np.array_split(idx, (os.cpu_count() or 1) * 4)
    gc.collect()
    with mp.get_context("fork").Pool(os.cpu_count()) as pool:
        b.add("decode", f"pillow, {os.cpu_count()} cores", **b.measure(lambda: pool.map(_pil_decode, chunks), len(idx)))
    for gpu in (False, True):
        name = "DALI mixed (GPU)" if gpu else "DALI CPU"
        why = dali_backend.available() or (None if not gpu or torch.cuda.is_available() else "no CUDA device")
        if why:
            b.add("decode", name, skipped=why, device="cuda" if gpu else "cpu")
            continue
        pipe, feed = _dali_pipe(ds, idx, gpu, decode=True, res=None)
        b.add("decode", name, device="cuda" if gpu else "cpu",
              **b.measure(lambda: _dali_run(pipe, feed), len(feed) * b.args.batch_size))


def _dali_pipe(ds, idx, gpu: bool, decode: bool, res):
    """A throwaway DALI pipeline over `idx`: decode only, or resize only (from decoded images)."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def
    bs = min(len(idx), 256)
    idx = idx[: len(idx) // bs * bs]
    if decode:
        feed = [ds.encoded_batch(idx[i:i + bs]) for i in range(0, len(idx), bs)]
    else:
        imgs = ds.images(idx)
        feed = [list(imgs[i:i + bs]) for i in range(0, len(idx), bs)]
    state = {"k": 0}

    def source():
        batch = feed[state["k"] % len(feed)]
        state["k"] += 1
        return batch

    @pipeline_def(batch_size=bs, num_threads=os.cpu_count(), device_id=0 if gpu else None, prefetch_queue_depth=2)
    def pipe():
        x = fn.external_source(source=source, batch=True, layout=None if decode else "HWC")
        if decode:
            return fn.decoders.image(x, device="mixed" if gpu else "cpu", output_type=types.RGB)
        return fn.resize(x.gpu() if gpu else x, size=[res, res], interp_type=types.INTERP_CUBIC, antialias=True)

    p = pipe()
    p.build()
    return p, feed


def _dali_run(pipe, feed):
    for _ in feed:
        pipe.run()


def stage_resize(b: Bench, ds, res: int, n: int):
    from PIL import Image
    idx = np.arange(min(n, len(ds)))
    imgs = ds.images(idx)
    pil = [Image.fromarray(x) for x in imgs]
    b.add("resize", "pillow(-simd) bicubic, 1 core", res=res,
          **b.measure(lambda: [im.resize((res, res), Image.BICUBIC) for im in pil], len(idx)))
    for gpu in (False, True):
        name = "DALI GPU cubic" if gpu else "DALI CPU cubic"
        why = dali_backend.available() or (None if not gpu or torch.cuda.is_available() else "no CUDA device")
        if why:
            b.add("resize", name, res=res, skipped=why, device="cuda" if gpu else "cpu")
            continue
        pipe, feed = _dali_pipe(ds, idx, gpu, decode=False, res=res)
        b.add("resize", name, res=res, device="cuda" if gpu else "cpu",
              **b.measure(lambda: _dali_run(pipe, feed), len(feed) * len(feed[0])))
    for dev in ("cpu", "cuda"):
        if dev == "cuda" and not torch.cuda.is_available():
            b.add("resize", "torch bicubic (antialias), GPU", res=res, device="cuda", skipped="no CUDA device")
            continue
        x = torch.from_numpy(imgs).to(dev).permute(0, 3, 1, 2)
        x = x if dev == "cpu" else x.float()
        f = lambda: torch.nn.functional.interpolate(x, size=(res, res), mode="bicubic", antialias=True)  # noqa: E731
        b.add("resize", f"torch bicubic (antialias), {dev.upper() if dev == 'cpu' else 'GPU'}", res=res, device=dev,
              dtype=str(x.dtype).removeprefix("torch."), **b.measure(f, len(idx)))


def stage_copy(b: Bench, res: int):
    if not torch.cuda.is_available():
        for kind in ("pinned", "pageable"):
            b.add("copy", f"host->device batch, {kind}", res=res, skipped="no CUDA device")
        return
    bs = b.args.batch_size
    nbytes = bs * 3 * res * res  # a uint8 batch, as the pil backend sends it
    for kind in ("pinned", "pageable"):
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=kind == "pinned")
        b.add("copy", f"host->device batch, {kind}", res=res, device="cuda", dtype="uint8",
              **b.measure(lambda: host.to("cuda", non_blocking=True), bs, nbytes))


def train_step_fn(b: Bench, res: int, stem: str, amp: str, channels_last: bool, compile_mode, classes: int):
    """A ResNet18 training step closure (model, SGD, CE loss) for device tensors."""
    model = build_model(classes, stem).to(b.device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    net = torch.compile(model, mode=compile_mode) if compile_mode else model
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    dtype = torch.bfloat16 if amp == "bf16" else None

    def step(x, y):
        with torch.autocast(b.device.type, dtype=dtype, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step, fmt


def model_configs(b: Bench, res: int):
    for stem in ("imagenet", "cifar"):
        for amp in ("off", "bf16"):
            for cl in (False, True):
                for comp in (None, "default"):
                    if b.args.quick and (amp, cl, comp) != ("bf16", True, None):
                        continue
                    if comp and not b.args.compile_all and (amp, cl) != ("bf16", True):
                        continue  # compiling costs ~a minute a configuration: the fast layout only
                    yield stem, amp, cl, comp


def stage_model(b: Bench, res: int, classes: int) -> dict:
    """The compute ceiling per configuration; returns {(stem, amp, channels_last, compile): img/s}."""
    ceiling = {}
    bs = b.args.batch_size
    for stem, amp, cl, comp in model_configs(b, res):
        name = f"{stem} stem, {'bf16' if amp == 'bf16' else 'fp32'}, {'NHWC' if cl else 'NCHW'}, " \
               f"{'compiled' if comp else 'eager'}"
        dtype = "bfloat16" if amp == "bf16" else "float32"
        if b.device.type == "cpu" and comp and not b.args.compile_cpu:
            b.add("model", name, res=res, dtype=dtype, skipped="torch.compile on the CPU takes minutes here; "
                  "--compile-cpu measures it")
            continue
        if b.device.type == "cpu" and stem == "cifar" and res > 64:
            b.add("model", name, res=res, dtype=dtype, skipped=f"cifar stem at res {res} on the CPU: minutes a step")
            continue
        step, fmt = train_step_fn(b, res, stem, amp, cl, comp, classes)
        x = torch.randn(bs, 3, res, res, device=b.device).contiguous(memory_format=fmt)
        y = torch.randint(0, classes, (bs,), device=b.device)
        k = b.args.steps
        t = time.perf_counter()
        step(x, y)  # first step apart: it compiles when compiled
        b.sync()
        first = time.perf_counter() - t
        rec = b.add("model", name, res=res, dtype=dtype, first_step_s=first,
                    **b.measure(lambda: [step(x, y) for _ in range(k)], bs * k))
        ceiling[(stem, amp, cl, comp)] = rec["img_per_s"]
    return ceiling


def loader_for(b: Bench, backend: str, res: int, augment: str, dtype=torch.bfloat16):
    return make_loader(b.args.data, b.args.split, backend=backend, res=res, batch_size=b.args.batch_size,
                       device=b.device, augment=augment, dtype=dtype, drop_last=True)


def _take(loader, n: int, step=None):
    """Consume n batches (one pass restarts as needed), optionally stepping the model on each."""
    done = 0
    while done < n:
        for images, labels in loader:
            if step is not None:
                step(images, labels.clamp(min=0))
            done += 1
            if done == n:
                return


def classic_loader(b: Bench, res: int):
    """ImageFolder over the split upscaled on disk with OpenCV INTER_CUBIC (prepared once)."""
    import cv2
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    ds = open_split(b.args.data, b.args.split)
    tag = f"{Path(b.args.data).resolve().name}-{b.args.split}-{len(ds)}-{res}"
    root = Path(b.args.cache) / f"classic-{tag}"
    if not (root / ".complete").exists():
        t = time.perf_counter()
        for i in range(len(ds)):
            d = root / (ds.classes[ds.labels[i]] if ds.labels[i] >= 0 else "unlabeled")
            d.mkdir(parents=True, exist_ok=True)
            im = cv2.cvtColor(ds.image(i), cv2.COLOR_RGB2BGR)
            cv2.imwrite(str(d / ds.keys[i]), cv2.resize(im, (res, res), interpolation=cv2.INTER_CUBIC))
        (root / ".complete").write_text(f"{time.perf_counter() - t:.1f} s to prepare\n")
    folder = ImageFolder(str(root), T.Compose([T.RandomHorizontalFlip(), T.ToTensor()]))
    gc.collect()
    return torch.utils.data.DataLoader(folder, batch_size=b.args.classic_batch_size, shuffle=True,
                                       num_workers=os.cpu_count(), pin_memory=b.device.type == "cuda",
                                       persistent_workers=True, drop_last=True)


def stage_loaders_and_classic(b: Bench, res: int):
    """Loader-only throughput of each backend and the classic pipeline, measured alternately."""
    loaders = {}
    for backend, why in {"resident": None, "pil": None, "dali": dali_backend.available()}.items():
        try:
            loaders[backend] = loader_for(b, backend, res, b.args.augment) if why is None else why
        except (MemoryError, RuntimeError, ValueError) as e:
            loaders[backend] = str(e)
    loaders["classic"] = classic_loader(b, res)
    n = b.args.batches
    results = {k: [] for k, v in loaders.items() if not isinstance(v, str)}
    for k in results:  # warm-up: a whole epoch, so workers are started and idle again, caches filled
        _take(loaders[k], len(loaders[k]))
    for _ in range(b.args.repeats):
        for k in results:
            def consume(loader=loaders[k]):
                # whole epochs by default: a loader left mid-epoch keeps its workers busy prefetching,
                # which would steal the cores from the next loader measured
                done = 0
                for x, _ in loader:
                    x = x.to(b.device, non_blocking=True)  # the classic path ends on the device too
                    done += len(x)
                    if n and done >= n * len(x):
                        break
                return done
            t = time.perf_counter()
            done = consume()
            b.sync()
            results[k].append(done / (time.perf_counter() - t))
    out = {}
    for k, loader in loaders.items():
        if isinstance(loader, str):
            b.add("loader", k, backend=k, res=res, skipped=loader)
            continue
        v = results[k]
        if k == "classic":
            out[k] = b.add("classic", "ImageFolder + OpenCV-upscaled files, loader only", backend="classic", res=res,
                           batch_size=b.args.classic_batch_size, dtype="float32", img_per_s=statistics.median(v),
                           repeats=len(v), augment="flip", runs=v)
        else:
            out[k] = b.add("loader", f"{k}, augment {b.args.augment}", backend=k, res=res, dtype="bfloat16",
                           img_per_s=statistics.median(v), repeats=len(v), augment=b.args.augment, runs=v)
    if "classic" in out:
        best = max((r for k, r in out.items() if k != "classic"), key=lambda r: r["img_per_s"], default=None)
        if best:
            best["vs_classic"] = best["img_per_s"] / out["classic"]["img_per_s"]
    return loaders


def stage_train(b: Bench, res: int, loaders: dict, ceiling: dict, classes: int):
    """Loader + training step per backend, and its share of the model-only ceiling."""
    key = ("imagenet", "bf16", True, None)
    step, _ = train_step_fn(b, res, *key, classes)
    n = max(2, b.args.steps)
    for k, loader in loaders.items():
        if isinstance(loader, str):
            b.add("train", k, backend=k, res=res, skipped=loader)
            continue
        if k == "classic":
            def run(loader=loader):
                for i, (x, y) in enumerate(loader):
                    x = x.to(b.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
                    step(x, y.to(b.device))
                    if i + 1 == n:
                        break
            per = b.args.classic_batch_size
        else:
            run, per = (lambda loader=loader: _take(loader, n, step)), b.args.batch_size
        rec = b.add("train", f"{k} + imagenet stem bf16 NHWC eager", backend=k, res=res, dtype="bfloat16",
                    batch_size=per, **b.measure(run, n * per))
        if key in ceiling:
            rec["vs_model"] = rec["img_per_s"] / ceiling[key]


# ---- output ---------------------------------------------------------------------------------------

def markdown(records: list[dict], env: dict, command: str) -> str:
    lines = [f"Command: `{command}`  ",
             f"Date: {env['date']}; machine: {env['cpu']} x{env['cores']}, GPU: {env['gpu'] or 'none'}; "
             f"torch {env['torch']}, torchvision {env['torchvision']}, DALI {env['dali']}, "
             f"pillow {env['pillow']} (simd: {env['pillow_simd']}), Python {env['python']}", "",
             "| stage | what | res | batch | device | img/s | MB/s | ratio | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        rate = "" if r["img_per_s"] is None else f"{r['img_per_s']:,.0f}"
        mb = f"{r['mb_per_s']:,.0f}" if r.get("mb_per_s") else ""
        ratio = (f"{r['vs_model']:.2f}x of model-only" if r.get("vs_model") else
                 f"{r['vs_classic']:.2f}x classic" if r.get("vs_classic") else "")
        note = f"skipped: {r['skipped']}" if r.get("skipped") else ""
        lines.append(f"| {r['stage']} | {r['name']} | {r['res'] or ''} | {r['batch_size']} | {r['device']} | "
                     f"{rate} | {mb} | {ratio} | {note} |")
    return "\n".join(lines) + "\n"


def plot(records: list[dict], path: Path, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    done = [r for r in records if r.get("img_per_s")]
    labels = [f"{r['stage']}: {r['name']}" + (f" @{r['res']}" if r["res"] else "") for r in done]
    stages = sorted({r["stage"] for r in done})
    colors = {s: plt.cm.tab10(i) for i, s in enumerate(stages)}
    fig, ax = plt.subplots(figsize=(11, 0.32 * len(done) + 1.5))
    ax.barh(range(len(done)), [r["img_per_s"] for r in done], color=[colors[r["stage"]] for r in done])
    ax.set_yticks(range(len(done)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("images per second (log scale)")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def table(records: list[dict]):
    from rich.table import Table
    t = Table(title="fasttin benchmarks")
    for c in ("stage", "what", "res", "device", "img/s", "MB/s", "ratio"):
        t.add_column(c, justify="left" if c in ("stage", "what") else "right")
    for r in records:
        ratio = r.get("vs_model") or r.get("vs_classic")
        t.add_row(r["stage"], r["name"], str(r["res"] or ""), r["device"],
                  "skipped" if r.get("skipped") else f"{r['img_per_s']:,.0f}",
                  f"{r['mb_per_s']:,.0f}" if r.get("mb_per_s") else "", f"{ratio:.2f}x" if ratio else "")
    return t


def summary(records: list[dict]):
    """The headline ratios: loader-only and end-to-end against the model-only ceiling, and classic."""
    from rich.table import Table
    t = Table(title="summary (model = imagenet stem, bf16, NHWC, eager)")
    for c in ("res", "model img/s", "backend", "loader img/s", "loader/model", "train img/s", "train/model"):
        t.add_column(c, justify="right")
    for res in sorted({r["res"] for r in records if r["res"]}):
        at = [r for r in records if r["res"] == res and r.get("img_per_s")]
        model = next((r["img_per_s"] for r in at if r["stage"] == "model"
                      and r["name"] == "imagenet stem, bf16, NHWC, eager"), None)
        for backend in ("resident", "dali", "pil", "classic"):
            ld = next((r["img_per_s"] for r in at
                       if r["stage"] in ("loader", "classic") and r["backend"] == backend), None)
            tr = next((r["img_per_s"] for r in at if r["stage"] == "train" and r["backend"] == backend), None)
            if ld is None and tr is None:
                continue
            f = lambda v: "" if v is None else f"{v:,.0f}"  # noqa: E731
            ratio = lambda v: "" if v is None or not model else f"{v / model:.2f}"  # noqa: E731
            t.add_row(str(res), f(model), backend, f(ld), ratio(ld), f(tr), ratio(tr))
    return t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="packed data set (default: a synthetic one made in a temporary folder)")
    p.add_argument("--split", default="val", help="split to read (default val)")
    p.add_argument("--res", help="comma-separated resolutions (default 64,224; 64 with --quick)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--classic-batch-size", type=int, default=100, help="the classic pipeline's batch (write-up: 100)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--augment", default="flip", help="augmentation of the loader stages (default flip)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per figure (median reported)")
    p.add_argument("--batches", type=int, default=0, help="batches per loader repeat (default 0: a whole epoch)")
    p.add_argument("--steps", type=int, default=5, help="training steps per model repeat")
    p.add_argument("--decode-images", type=int, default=4096, help="images per decode/resize repeat")
    p.add_argument("--compile-all", action="store_true", help="compile every model configuration, not only "
                   "bf16 channels_last")
    p.add_argument("--summarize", type=Path, metavar="JSON", help="print the short summary of a finished run and exit")
    p.add_argument("--compile-cpu", action="store_true", help="also measure torch.compile on the CPU (slow)")
    p.add_argument("--cache", default="bench-out/cache", help="where the classic pipeline's upscaled files go")
    p.add_argument("--stages", default="read,decode,resize,copy,model,loader,train",
                   help="which stages to run (loader includes the classic pipeline; train needs model for ratios)")
    p.add_argument("--quick", action="store_true", help="a tiny synthetic set and few repeats (CI smoke)")
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    p.add_argument("--plot", type=Path)
    args = p.parse_args(argv)
    if args.summarize:
        from rich.console import Console
        Console().print(summary(json.loads(args.summarize.read_text())["records"]))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("benchmarks.run: error: --device cuda but no CUDA device here; use --device cpu", file=sys.stderr)
        return 2
    resolutions = [int(r) for r in (args.res or ("64" if args.quick else "64,224")).split(",")]
    tmp = None
    if args.quick:
        args.repeats, args.batches, args.steps, args.decode_images = 2, 0, 1, 256
        args.batch_size = min(args.batch_size, 16)
        args.classic_batch_size = min(args.classic_batch_size, 16)
    if args.data is None:
        from fasttin.pack import pack
        tmp = tempfile.TemporaryDirectory(prefix="fasttin-bench-")
        args.data = tmp.name
        args.cache = os.path.join(tmp.name, "cache")
        pack(None, args.data, synthetic=8 if args.quick else 50, classes=20 if args.quick else 200, quiet=True)
    torch.manual_seed(0)
    device = torch.device(args.device)
    b = Bench(args, device)
    env = {**environment(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    command = "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:])
    try:
        ds = open_split(args.data, args.split)
    except (FileNotFoundError, ValueError) as e:  # FormatError is a ValueError
        print(f"benchmarks.run: error: {e}", file=sys.stderr)
        return 2
    classes = len(ds.classes)
    print(f"benchmarks on {device} ({env['gpu'] or env['cpu']}), {len(ds):,} {args.split} images from {args.data}",
          file=sys.stderr)
    stages = set(args.stages.split(","))
    if "read" in stages:
        stage_read(b, ds)
    if "decode" in stages:
        stage_decode(b, ds, args.decode_images)
    for res in resolutions:
        if "resize" in stages:
            stage_resize(b, ds, res, args.decode_images)
        if "copy" in stages:
            stage_copy(b, res)
        ceiling = stage_model(b, res, classes) if "model" in stages else {}
        if stages & {"loader", "train"}:
            loaders = stage_loaders_and_classic(b, res)
            if "train" in stages:
                stage_train(b, res, loaders, ceiling, classes)
            del loaders
            gc.collect()
    for r in b.records:
        r["environment"] = env
    out = {"environment": env, "command": command, "records": b.records}
    if args.json:
        write_atomic(args.json, json.dumps(out, indent=1).encode())
    if args.markdown:
        write_atomic(args.markdown, markdown(b.records, env, command).encode())
    if args.plot:
        plot(b.records, args.plot, f"fasttin, {env['gpu'] or env['cpu'] + ' x' + str(env['cores'])}, {env['date']}")
    from rich.console import Console
    Console().print(table(b.records))
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
