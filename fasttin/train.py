"""python -m fasttin.train: ResNet18 on packed Tiny-ImageNet, one recipe per command.

Reads top to bottom: flags -> settings -> data -> model -> optimiser -> (resume) -> epochs of
train + validate + checkpoint -> summary. Runs on one GPU, on several under torchrun
(DistributedDataParallel over the loaders' rank split), or slowly on the CPU.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from fasttin import checkpoint, report
from fasttin.checkpoint import CheckpointError
from fasttin.fileio import write_json_atomic
from fasttin.info import environment
from fasttin.loaders import AUGMENTS, BACKENDS, make_loader
from fasttin.loop import NonFiniteLoss, evaluate, lr_factor, make_optimizer, train_epoch
from fasttin.model import STEMS, PretrainedError, build_model, imagenet_state_dict, load_pretrained, read_state_dict
from fasttin.pack import DEFAULT_OUT
from fasttin.recipes import RECIPES, WRITEUP_TOP1, resolve
from fasttin.shards import FormatError, read_manifest

AMP_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": torch.float32}


class UsageError(Exception):
    """A bad flag or input: reported as one line, exit status 2."""


def positive(kind):
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"{text} must be positive")
        return v
    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fasttin.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_OUT, help="packed data set (python -m fasttin.pack)")
    p.add_argument("--recipe", choices=list(RECIPES),
                   help="named defaults (default: seed-224 at --res 224 or without --res, fast otherwise)")
    p.add_argument("--res", type=positive(int), help="image side the model sees; 64 is native, more is a "
                   "bicubic upscale on the device")
    p.add_argument("--epochs", type=positive(int), help="epochs to train (recipe's by default)")
    p.add_argument("--batch-size", type=positive(int), help="global batch size, split over processes")
    p.add_argument("--lr", type=positive(float), help="peak learning rate for the global batch")
    p.add_argument("--weight-decay", type=float, help="L2 on conv/linear weights (not norms, biases)")
    p.add_argument("--stem", choices=STEMS, help="imagenet: 7x7/2 conv + max-pool; cifar: 3x3/1, no max-pool")
    p.add_argument("--pretrained", help="none | imagenet | PATH to a fasttin checkpoint or torchvision state dict")
    p.add_argument("--amp", choices=list(AMP_DTYPE), help="autocast precision; fp16 adds a gradient scaler")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last (NHWC) model and inputs")
    p.add_argument("--compile", nargs="?", const="default", metavar="MODE",
                   help="torch.compile the model (optional mode, e.g. max-autotune)")
    p.add_argument("--backend", choices=BACKENDS, help="data loader backend")
    p.add_argument("--augment", choices=AUGMENTS, help="augmentation at 64x64 before the upscale")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="flip test-time augmentation in validation")
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when available")
    p.add_argument("--out", type=Path, help="run folder (default: runs/<recipe>)")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.pt")
    p.add_argument("--seed", type=int, default=0, help="seed of the model init, data order and augmentation")
    p.add_argument("--workers", type=positive(int), help="loader threads/processes (default: all cores)")
    p.add_argument("--log-every", type=positive(int), default=25, help="steps between live-view updates "
                   "(the only host-device synchronisation in the loop)")
    return p


def settings(args) -> dict:
    recipe = args.recipe or ("seed-224" if args.res in (None, 224) else "fast")
    cfg = resolve(recipe, res=args.res, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                  weight_decay=args.weight_decay, stem=args.stem, pretrained=args.pretrained, amp=args.amp,
                  channels_last=args.channels_last, compile=args.compile, backend=args.backend,
                  augment=args.augment, tta=args.tta)
    if cfg["res"] < 16:
        raise UsageError(f"--res {cfg['res']}: at least 16")
    cfg.update(seed=args.seed, data=str(args.data), out=str(args.out or Path("runs") / recipe),
               workers=args.workers, log_every=args.log_every)
    return cfg


def setup_distributed(device_arg: str | None) -> tuple[int, int, torch.device]:
    """(rank, world_size, device) from torchrun's environment, or a single process."""
    cuda = torch.cuda.is_available() if device_arg is None else device_arg == "cuda"
    if cuda and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device here; use --device cpu")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), world, torch.device(f"cuda:{local}" if cuda else "cpu")


def initial_weights(model: nn.Module, source: str, log) -> list[str]:
    if source == "none":
        return []
    sd = imagenet_state_dict() if source == "imagenet" else read_state_dict(source)
    fresh = load_pretrained(model, sd, name=f"--pretrained {source}")
    log(f"weights from {source}; freshly initialised: {', '.join(fresh) or 'nothing'}")
    return fresh


def run(cfg: dict, *, device: torch.device, rank: int, world: int, resume: bool) -> dict:
    main = rank == 0
    say = report.console.print if main else (lambda *a, **k: None)
    out = Path(cfg["out"])
    manifest = read_manifest(cfg["data"])
    num_classes = len(manifest["classes"])
    torch.manual_seed(cfg["seed"])
    if cfg["batch_size"] % world:
        raise UsageError(f"--batch-size {cfg['batch_size']} does not split over {world} processes")
    per_rank = cfg["batch_size"] // world
    dtype = AMP_DTYPE[cfg["amp"]]

    # data: train drops its last partial batch; val is whole, padded across ranks and the padding masked
    common = dict(backend=cfg["backend"], res=cfg["res"], device=device, seed=cfg["seed"], rank=rank,
                  world_size=world, dtype=dtype, workers=cfg["workers"])
    train_loader = make_loader(cfg["data"], "train", batch_size=per_rank, augment=cfg["augment"], shuffle=True,
                               drop_last=True, **common)
    val_loader = make_loader(cfg["data"], "val", batch_size=per_rank, augment="none", shuffle=False,
                             drop_last=False, **common)
    say(f"data: {len(train_loader.ds):,} train / {len(val_loader.ds):,} val images, {num_classes} classes, "
        f"backend {train_loader.backend}, res {cfg['res']}, global batch {cfg['batch_size']} on {world} "
        f"process(es) of {device.type}")

    # model
    model = build_model(num_classes, cfg["stem"])
    fresh = initial_weights(model, cfg["pretrained"], say) if not resume else []
    model = model.to(device, memory_format=torch.channels_last if cfg["channels_last"] else torch.contiguous_format)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else model
    net = torch.compile(ddp, mode=cfg["compile"]) if cfg["compile"] else ddp
    optimizer = make_optimizer(model, cfg)
    steps_per_epoch = len(train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, steps_per_epoch))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg["amp"] == "fp16")
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg["label_smoothing"])

    # resume: the last checkpoint, and metrics only up to it (no epoch repeated or skipped)
    start_epoch, first_batch, best, rows = 0, 0, 0.0, []
    if resume:
        ckpt = checkpoint.load(out / "last.pt")
        checkpoint.check_fits(ckpt, num_classes, cfg["stem"], where=str(out / "last.pt"))
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        checkpoint.set_rng_state(ckpt["rng"])
        start_epoch, first_batch, best = ckpt["epoch"], ckpt.get("step", 0), ckpt.get("best_acc1", 0.0)
        rows = [r for r in report.read_metrics(out / "metrics.jsonl") if r["epoch"] <= start_epoch]
        say(f"resumed from {out / 'last.pt'}: {start_epoch} epoch(s) done"
            + (f", {first_batch} batch(es) into epoch {start_epoch + 1}" if first_batch else ""))
    if main:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "config.json", {**cfg, "world_size": world, "device": str(device),
                                                "num_classes": num_classes, "fresh_init": fresh,
                                                "environment": environment()})
        report.write_metrics(out / "metrics.jsonl", rows)

    def state(epoch: int, step: int = 0) -> dict:
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch, "step": step,
                "rng": checkpoint.rng_state(), "config": cfg, "best_acc1": best,
                "arch": {"name": "resnet18", "stem": cfg["stem"], "num_classes": num_classes, "res": cfg["res"]},
                "classes": [c["wnid"] for c in manifest["classes"]],
                "words": [c["words"] for c in manifest["classes"]]}

    # A signal stops the run at a step boundary. Under torchrun every rank must stop at the same
    # step or the others hang in an all-reduce: ranks agree on it at the logging steps (which
    # synchronise anyway) and at the end of an epoch.
    stop = {"signal": None, "agreed": False}

    def on_signal(signum, frame):
        stop["signal"] = signal.Signals(signum).name

    def agree() -> bool:
        flag = stop["signal"] is not None
        if world > 1:
            t = torch.tensor([float(flag)], device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
        stop["agreed"] = flag
        stop["signal"] = stop["signal"] or ("SIGTERM" if flag else None)
        return flag
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    compile_s = None
    try:
        with report.LiveView(main) as view:
            for epoch in range(start_epoch, cfg["epochs"]):
                train_loader.set_epoch(epoch, first_batch)
                view.start_epoch(epoch + 1, steps_per_epoch, first_batch)
                t0 = time.perf_counter()
                tstep = {"t": t0, "n": 0}

                def on_first_step():  # with --compile, the first step compiles: timed apart
                    nonlocal compile_s, t0
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    compile_s, t0 = time.perf_counter() - t0, time.perf_counter()
                    tstep.update(t=t0, n=1)

                def on_log(steps, m):
                    now = time.perf_counter()
                    view.update(first_batch + steps, m["loss"], (steps - tstep["n"]) * cfg["batch_size"]
                                / max(now - tstep["t"], 1e-9))
                    tstep.update(t=now, n=steps)
                    agree()

                train, steps = train_epoch(net, train_loader, optimizer, scheduler, scaler, loss_fn, device=device,
                                           amp=cfg["amp"], log_every=cfg["log_every"], on_log=on_log,
                                           should_stop=lambda: stop["agreed"] if world > 1
                                           else stop["signal"] is not None,
                                           on_first_step=on_first_step if cfg["compile"] and compile_s is None
                                           else None)
                train_s = time.perf_counter() - t0
                timed = steps - 1 if epoch == start_epoch and cfg["compile"] else steps
                if stop["agreed" if world > 1 else "signal"] and first_batch + steps < steps_per_epoch:
                    if main:
                        checkpoint.save(out / "last.pt", state(epoch, first_batch + steps))
                    say(f"{stop['signal']}: saved {out / 'last.pt'} at batch {first_batch + steps} of epoch "
                        f"{epoch + 1}; --resume continues from there")
                    return {"interrupted": True}
                val = evaluate(net, val_loader, device=device, amp=cfg["amp"], tta=cfg["tta"])
                row = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], "train_loss": train["loss"],
                       "train_acc": train["acc1"], "val_loss": val["loss"], "val_acc1": val["acc1"],
                       "val_acc5": val["acc5"], "epoch_s": time.perf_counter() - t0,
                       "train_img_s": timed * cfg["batch_size"] / max(train_s, 1e-9)}
                rows.append(row)
                best = max(best, val["acc1"])
                first_batch = 0
                if main:  # metrics first, then the checkpoint: a crash between them only repeats the epoch
                    report.write_metrics(out / "metrics.jsonl", rows)
                    checkpoint.save(out / "last.pt", state(epoch + 1))
                    if val["acc1"] >= best:
                        checkpoint.save(out / "best.pt", state(epoch + 1))
                    view.end_epoch(row)
                if agree():
                    say(f"{stop['signal']}: stopped after epoch {epoch + 1}; --resume continues")
                    return {"interrupted": True}
    finally:
        for s, h in old.items():
            signal.signal(s, h)

    summary = {"recipe": cfg["recipe"], "epochs": len(rows), "best_val_acc1": best,
               "final_val_acc1": rows[-1]["val_acc1"] if rows else None,
               "final_val_acc5": rows[-1]["val_acc5"] if rows else None,
               "train_s": sum(r["epoch_s"] for r in rows), "compile_s": compile_s,
               "writeup_val_acc1": WRITEUP_TOP1.get(cfg["recipe"]), "device": str(device), "world_size": world}
    if main and rows:
        write_json_atomic(out / "summary.json", summary)
        report.plot_curves(rows, out / "curves.png", f"fasttin {cfg['recipe']}, res {cfg['res']}, {device.type}")
        report.console.print(report.closing_table(rows, f"{cfg['recipe']} -> {out}"))
    return summary


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parser().parse_args(argv)
    try:
        cfg = settings(args)
        rank, world, device = setup_distributed(args.device)
        summary = run(cfg, device=device, rank=rank, world=world, resume=args.resume)
    except (UsageError, PretrainedError, CheckpointError, FormatError, FileNotFoundError, ValueError,
            MemoryError, NonFiniteLoss) as e:
        what = "stopped" if isinstance(e, NonFiniteLoss) else "error"
        extra = "; the last good checkpoint is intact" if isinstance(e, NonFiniteLoss) else ""
        print(f"fasttin.train: {what}: {e}{extra}", file=sys.stderr)
        return 3 if isinstance(e, NonFiniteLoss) else 2
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 130 if summary.get("interrupted") else 0


if __name__ == "__main__":
    sys.exit(main())
