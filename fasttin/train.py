"""python -m fasttin.train: ResNet18 on packed Tiny-ImageNet, one recipe per command.

Reads top to bottom: flags -> settings -> run folder (fresh, resume or refuse) -> data -> model
-> (resume) -> fit: epochs of train + validate + checkpoint -> summary and verdict. Runs on one
GPU, on several under torchrun (DistributedDataParallel over the loaders' rank split), or slowly
on the CPU. Exit codes: 0 done, 2 bad input (nothing lost), 3 non-finite loss or weights (the
last good checkpoint kept), 130 stopped by SIGINT/SIGTERM (position saved).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from fasttin import checkpoint, report, rundir
from fasttin.checkpoint import CheckpointError
from fasttin.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_NONFINITE, EXIT_OK, UserError
from fasttin.fileio import write_json_atomic
from fasttin.info import environment
from fasttin.loaders import make_loader
from fasttin.loop import AMP_DTYPE, NonFinite, StepClock, evaluate, make_step, shares, train_epoch, verdict
from fasttin.model import PretrainedError, build_model, imagenet_state_dict, load_pretrained, read_state_dict
from fasttin.pack import DEFAULT_OUT
from fasttin.profiling import StepProfiler
from fasttin.recipes import RECIPES, SETTINGS, WRITEUP_TOP1, Setting, SettingError, resolve
from fasttin.shards import FormatError, read_manifest
from fasttin.signals import StopRequest

PROG = "python -m fasttin.train"
CPU_HINT = ("no CUDA device: this is a GPU workload and will be slow here; --res 64, a --classes subset at pack "
            "time (python -m fasttin.pack --classes 10) and fewer --epochs make a CPU run short")


class UsageError(UserError):
    """A bad flag or a combination that cannot run."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, with its errors as one line (the culprit named) and exit status 2."""

    def error(self, message):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (--help lists the flags)\n")


def _typed(s):
    def parse(text):
        try:
            return s.parse(text)
        except SettingError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = s.kind.__name__
    return parse


def _add_setting(p: argparse.ArgumentParser, s) -> None:
    """One flag per setting of the table; its default stays None so the recipe's value applies."""
    if s.kind is bool:
        p.add_argument(s.flag, action=argparse.BooleanOptionalAction, default=None, help=s.help)
    elif s.name == "compile":
        p.add_argument(s.flag, nargs="?", const="default", metavar="MODE", help=s.help)
    else:
        p.add_argument(s.flag, type=_typed(s), choices=s.choices, help=s.help,
                       metavar=None if s.choices else s.name.upper())


def _int_setting(name, positive=False):
    return Setting(name, None, int, "", positive=positive)


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_OUT, help="packed data set (python -m fasttin.pack)")
    p.add_argument("--recipe", choices=list(RECIPES),
                   help="named defaults (default: seed-224 at --res 224 or without --res, fast otherwise)")
    for s in SETTINGS:
        _add_setting(p, s)
    run = p.add_argument_group("the run")
    run.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when available")
    run.add_argument("--out", type=Path, help="run folder (default: runs/<recipe>)")
    run.add_argument("--resume", action="store_true", help="continue the run in --out (settings must match)")
    run.add_argument("--auto-resume", action="store_true", help="resume if --out has a last.pt, else start "
                     "fresh: the flag for torchrun --max-restarts and re-invoked jobs")
    run.add_argument("--overwrite", action="store_true", help="start afresh in a folder that holds a run, "
                     "moving the old files into --out/replaced-<time>/")
    run.add_argument("--seed", type=_typed(_int_setting("seed")), default=0,
                     help="seed of the model init, data order and augmentation")
    run.add_argument("--workers", type=_typed(_int_setting("workers", positive=True)),
                     help="loader threads/processes (default: all cores)")
    run.add_argument("--log-every", type=_typed(_int_setting("log_every", positive=True)), default=25,
                     help="steps between live-view updates (the only host-device synchronisation in the loop)")
    run.add_argument("--profile", type=_typed(_int_setting("profile", positive=True)), metavar="STEPS",
                     help="torch.profiler over STEPS steps after a warm-up: RUN_DIR/profile/trace.json "
                     "(Perfetto, TensorBoard) and top_ops.txt")
    return p




def settings(args) -> dict:
    """The resolved settings: the table's defaults, the recipe, the flags; plus the run's own."""
    recipe = args.recipe or ("seed-224" if args.res in (None, 224) else "fast")
    try:
        cfg = resolve(recipe, **{s.name: getattr(args, s.name) for s in SETTINGS})
    except SettingError as e:
        raise UsageError(str(e)) from None
    cfg.update(seed=args.seed, data=str(args.data), out=str(args.out or Path("runs") / recipe),
               workers=args.workers, log_every=args.log_every, profile=args.profile)
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
    # torchrun's agent keeps one store across restarts (--max-restarts): without a prefix per attempt,
    # a restarted rank can read the dead attempt's gloo/NCCL addresses and fail to connect, or hang.
    store, rank, size = next(dist.rendezvous("env://"))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group("nccl" if cuda else "gloo", store=dist.PrefixStore(f"fasttin/attempt{attempt}", store),
                            rank=rank, world_size=size)
    return dist.get_rank(), world, torch.device(f"cuda:{local}" if cuda else "cpu")


# --- the run folder -------------------------------------------------------------------------------

@dataclass
class Plan:
    """What this invocation does: settings, processes, and whether it resumes."""
    cfg: dict
    device: torch.device
    rank: int = 0
    world: int = 1
    resume: bool = False
    explicit_pretrained: bool = False
    manifest: dict = field(default_factory=dict)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def out(self) -> Path:
        return Path(self.cfg["out"])

    def say(self, *a, **k) -> None:
        """A log line on rank 0: never wrapped (a message stays one line whatever its path's length)
        and never read as rich markup (a path may hold brackets)."""
        if self.main:
            report.console.print(*a, **{"soft_wrap": True, "markup": False, "highlight": False, **k})


def read_classes(cfg: dict) -> dict:
    try:
        manifest = read_manifest(cfg["data"])
    except FileNotFoundError as e:
        raise UsageError(f"--data {e}") from None
    cfg["classes"] = [c["wnid"] for c in manifest["classes"]]
    return manifest


def inherit_fallback(cfg: dict, out: Path, explicit: bool) -> None:
    """A run that fell back from the recipe's ImageNet weights to none keeps that on resume."""
    old = out / "config.json"
    if explicit or cfg["pretrained"] != "imagenet" or not old.is_file():
        return
    try:
        was = json.loads(old.read_text())
    except (OSError, json.JSONDecodeError):
        return
    if isinstance(was, dict) and was.get("pretrained") == "none" and was.get("pretrained_reason"):
        cfg.update(pretrained="none", pretrained_reason=was["pretrained_reason"])


def prepare_folder(plan: Plan, *, resume: bool, auto_resume: bool, overwrite: bool) -> None:
    """rundir.prepare on rank 0 (fresh, resume or a one-line refusal); the decision is shared."""
    result = None
    if plan.main:
        if resume or auto_resume:
            inherit_fallback(plan.cfg, plan.out, plan.explicit_pretrained)
        try:
            result = rundir.prepare(plan.out, plan.cfg, resume=resume, auto_resume=auto_resume, overwrite=overwrite)
        except UserError as e:
            result = e
    if plan.world > 1:
        box = [result]
        dist.broadcast_object_list(box, src=0)
        result = box[0]
    if isinstance(result, UserError):
        raise result
    plan.resume, notes = result
    for note in notes:
        plan.say(note)
    if plan.resume and not plan.main:
        inherit_fallback(plan.cfg, plan.out, plan.explicit_pretrained)


# --- data -----------------------------------------------------------------------------------------

@dataclass
class Data:
    train: object
    val: object
    classes: list
    words: list


def open_data(plan: Plan) -> Data:
    """Train drops its last partial batch; val is whole, padded across ranks and the padding masked."""
    cfg, world = plan.cfg, plan.world
    if cfg["batch_size"] % world:
        raise UsageError(f"--batch-size {cfg['batch_size']} does not split over {world} processes")
    n_train = plan.manifest.get("splits", {}).get("train", {}).get("count", cfg["batch_size"])
    if cfg["batch_size"] > n_train:
        raise UsageError(f"--batch-size {cfg['batch_size']}: more than the {n_train} training images of {cfg['data']}")
    common = dict(backend=cfg["backend"], res=cfg["res"], device=plan.device, seed=cfg["seed"], rank=plan.rank,
                  world_size=world, dtype=AMP_DTYPE[cfg["amp"]], workers=cfg["workers"],
                  batch_size=cfg["batch_size"] // world)
    train = make_loader(cfg["data"], "train", augment=cfg["augment"], shuffle=True, drop_last=True, **common)
    val = make_loader(cfg["data"], "val", augment="none", shuffle=False, drop_last=False, **common)
    classes = plan.manifest["classes"]
    plan.say(f"data: {len(train.ds):,} train / {len(val.ds):,} val images, {len(classes)} classes, backend "
             f"{train.backend}, res {cfg['res']}, global batch {cfg['batch_size']} on {world} process(es) of "
             f"{plan.device.type}")
    return Data(train, val, [c["wnid"] for c in classes], [c["words"] for c in classes])


# --- model ----------------------------------------------------------------------------------------

def initial_weights(model, plan: Plan) -> list[str]:
    """Load --pretrained. When the recipe (not an explicit flag) asks for ImageNet weights that
    cannot be had here, train from scratch and record why: no figure passes for a pretrained one."""
    cfg = plan.cfg
    if cfg["pretrained"] == "none" or plan.resume:
        return []
    try:
        sd = imagenet_state_dict() if cfg["pretrained"] == "imagenet" else read_state_dict(cfg["pretrained"])
    except PretrainedError as e:
        if cfg["pretrained"] != "imagenet" or plan.explicit_pretrained:
            raise
        plan.say(f"the ImageNet weights cannot be had here, so {cfg['recipe']} trains from scratch "
                 "(recorded as pretrained none; --pretrained PATH uses a local copy)")
        cfg.update(pretrained="none", pretrained_reason=str(e).split(";")[0])
        return []
    fresh = load_pretrained(model, sd, name=f"--pretrained {cfg['pretrained']}")
    plan.say(f"weights from {cfg['pretrained']}; freshly initialised: {', '.join(fresh) or 'nothing'}")
    return fresh


def build(plan: Plan, data: Data):
    """(TrainStep, the names of the freshly initialised tensors)."""
    cfg = plan.cfg
    torch.manual_seed(cfg["seed"])
    model = build_model(len(data.classes), cfg["stem"])
    fresh = initial_weights(model, plan)
    return make_step(model, cfg, device=plan.device, steps_per_epoch=len(data.train), world=plan.world), fresh


def write_config(plan: Plan, data: Data, fresh: list[str]) -> None:
    """config.json: every setting as actually used (after a fallback), and where it ran."""
    if plan.main:
        write_json_atomic(plan.out / "config.json", {
            **plan.cfg, "world_size": plan.world, "device": str(plan.device), "num_classes": len(data.classes),
            "fresh_init": fresh, "environment": environment()})


# --- resume ---------------------------------------------------------------------------------------

@dataclass
class Position:
    epoch: int = 0  # epochs done
    batch: int = 0  # batches done into the next epoch
    best: float = 0.0
    rows: list = field(default_factory=list)


def restore(plan: Plan, step, data: Data) -> Position:
    """The last checkpoint, and metrics only up to it (no epoch repeated or skipped)."""
    if not plan.resume:
        if plan.main:
            report.write_metrics(plan.out / "metrics.jsonl", [])
        return Position()
    where = plan.out / "last.pt"
    ckpt = checkpoint.load(where)
    checkpoint.check_fits(ckpt, len(data.classes), plan.cfg["stem"], where=str(where))
    step.load_state_dict(ckpt)
    checkpoint.set_rng_state(ckpt["rng"])
    pos = Position(ckpt["epoch"], ckpt.get("step", 0), ckpt.get("best_acc1", 0.0))
    rows = report.read_metrics(plan.out / "metrics.jsonl")
    pos.rows = [r for r in rows if r["epoch"] <= pos.epoch]
    if plan.main and pos.rows != rows:
        report.write_metrics(plan.out / "metrics.jsonl", pos.rows)
    plan.say(f"resumed from {where}: {pos.epoch} epoch(s) done"
             + (f", {pos.batch} batch(es) into epoch {pos.epoch + 1}" if pos.batch else ""))
    return pos


# --- fit ------------------------------------------------------------------------------------------

def better_backend(plan: Plan, data: Data) -> str | None:
    """The advice for a data-bound run: the backend that would fit, if the run did not use it."""
    from fasttin.loaders import dali, resident
    used, n = data.train.backend, len(data.train.ds)
    need = resident.needed_bytes(n, plan.cfg["batch_size"] // plan.world, plan.cfg["res"])
    free = resident.free_memory(plan.device)
    if used != "resident" and need <= free:
        return f"the split fits on {plan.device} ({need / 2**30:.2f} GiB): try --backend resident"
    if used == "pil" and plan.device.type == "cuda" and dali.available() is None:
        return "the split does not fit on the device: try --backend dali"
    return None


class Fit:
    """The epochs of one invocation: train, validate, check, save; stop cleanly on a signal."""

    def __init__(self, plan: Plan, step, data: Data, pos: Position, stop: StopRequest):
        self.plan, self.step, self.data, self.pos, self.stop = plan, step, data, pos, stop
        self.cfg, self.out = plan.cfg, plan.out
        self.clock = StepClock(plan.device)
        self.profiler = StepProfiler(self.cfg["profile"], self.out, plan.device, say=plan.say) \
            if self.cfg.get("profile") and plan.main else None
        if self.profiler:
            self.profiler.attach(step)
        self.compile_s = None
        self.started = time.perf_counter()
        self.rate_said = False

    def run(self) -> dict:
        with report.LiveView(self.plan.main) as self.view:
            for epoch in range(self.pos.epoch, self.cfg["epochs"]):
                if not self.epoch(epoch):
                    return {"interrupted": True}
                if self.stop.agree():
                    self.plan.say(f"{self.stop.name}: stopped after epoch {epoch + 1}; --resume continues")
                    return {"interrupted": True}
        if self.profiler:
            self.profiler.finish()
        return self.summary()

    def epoch(self, epoch: int) -> bool:
        """One epoch; False when a signal stopped it midway (its position saved)."""
        spe, first = len(self.data.train), self.pos.batch
        self.data.train.set_epoch(epoch, first)
        self.view.start_epoch(epoch + 1, spe, first)
        t0 = self.epoch_t0 = time.perf_counter()
        train, steps = train_epoch(self.step, self.data.train, clock=self.clock, log_every=self.cfg["log_every"],
                                   on_log=lambda n, m: self.on_log(epoch, first + n, m),
                                   should_stop=self.stop.should_stop,
                                   on_step=self.profiler.on_step if self.profiler else None)
        if self.stop.should_stop() and first + steps < spe:
            self.save_position(epoch, first + steps)
            return False
        if steps % self.cfg["log_every"]:  # an epoch shorter than the cadence still reports (rate, progress)
            self.on_log(epoch, first + steps, train)
        times = self.clock.take()
        if self.cfg["compile"] and self.compile_s is None:
            self.compile_s = self.clock.first_compute_s
        t1 = time.perf_counter()
        val = evaluate(self.step.net, self.data.val, device=self.plan.device, amp=self.cfg["amp"], tta=self.cfg["tta"])
        times["eval_s"] = time.perf_counter() - t1
        row = {"epoch": epoch + 1, "lr": self.step.epoch_lr(epoch), "train_loss": train["loss"],
               "train_acc": train["acc1"], "val_loss": val["loss"], "val_acc1": val["acc1"],
               "val_acc5": val["acc5"], "train_img_s": self.train_rate(steps, times, epoch), **times}
        self.end_epoch(epoch, row, val["acc1"], t0)
        return True

    def train_rate(self, steps: int, times: dict, epoch: int) -> float:
        seconds, n = times["data_wait_s"] + times["compute_s"], steps
        if self.cfg["compile"] and epoch == self.pos.epoch and self.compile_s is not None and steps > 1:
            seconds, n = seconds - self.compile_s, steps - 1  # the first step compiles: timed apart
        return n * self.cfg["batch_size"] / max(seconds, 1e-9)

    def end_epoch(self, epoch: int, row: dict, acc1: float, t0: float) -> None:
        """Metrics first, then the checkpoints (a crash between them only repeats the epoch), then
        the row again with the checkpoint's time. Nothing non-finite is saved."""
        self.ensure_finite(f"after epoch {epoch + 1}")
        is_best, self.pos.best = acc1 >= self.pos.best, max(self.pos.best, acc1)
        self.pos.batch = 0
        self.pos.rows.append(row)
        t2 = time.perf_counter()
        if self.plan.main:
            report.write_metrics(self.out / "metrics.jsonl", self.pos.rows)
            state = self.state(epoch + 1, 0)
            checkpoint.save(self.out / "last.pt", state)
            if is_best:
                checkpoint.save(self.out / "best.pt", state)
        row["checkpoint_s"] = time.perf_counter() - t2
        row["epoch_s"] = time.perf_counter() - t0
        row.update(shares(row, row["epoch_s"]))
        if self.plan.main:
            report.write_metrics(self.out / "metrics.jsonl", self.pos.rows)
            self.view.end_epoch(row)

    def ensure_finite(self, where: str) -> None:
        if not self.step.weights_finite():
            raise NonFinite(f"the weights became non-finite {where}; they were not saved")

    def save_position(self, epoch: int, batch: int) -> None:
        """A signal stopped the epoch: save where it is (if finite), to continue from there."""
        self.ensure_finite(f"in epoch {epoch + 1}")
        if self.plan.main:
            checkpoint.save(self.out / "last.pt", self.state(epoch, batch))
        self.plan.say(f"{self.stop.name}: saved {self.out / 'last.pt'} at batch {batch} of epoch {epoch + 1}; "
                      "--resume continues from there")

    def state(self, epoch: int, batch: int) -> dict:
        return {**self.step.state_dict(), "epoch": epoch, "step": batch, "rng": checkpoint.rng_state(),
                "config": self.cfg, "best_acc1": self.pos.best, "classes": self.data.classes,
                "words": self.data.words, "arch": {"name": "resnet18", "stem": self.cfg["stem"],
                                                   "num_classes": len(self.data.classes), "res": self.cfg["res"]}}

    def on_log(self, epoch: int, steps: int, m: dict) -> None:
        """At the logging steps (which synchronise anyway): live view, progress file, stop agreement."""
        now = time.perf_counter()
        t = self.clock.totals
        busy = t["data_wait_s"] + t["compute_s"]
        done = steps - self.pos.batch if epoch == self.pos.epoch else steps
        rate = (steps - (self.pos.batch if epoch == self.pos.epoch else 0)) * self.cfg["batch_size"] / max(busy, 1e-9)
        self.view.update(steps, m["loss"], rate, t["data_wait_s"] / max(busy, 1e-9))
        if self.plan.main:
            write_progress(self.out, epoch + 1, steps, len(self.data.train))
            if not self.rate_said and done >= 1:
                self.say_rate(epoch, rate, now)
        self.stop.agree()

    def say_rate(self, epoch: int, rate: float, now: float) -> None:
        self.rate_said = True
        per_epoch = len(self.data.train) * self.cfg["batch_size"] / max(rate, 1e-9)
        left = self.cfg["epochs"] - epoch
        self.plan.say(f"measured {rate:,.0f} img/s over the first steps: about {_duration(per_epoch)} of training "
                      f"an epoch, {_duration(per_epoch * left)} for the {left} epoch(s) left (validation extra)")

    def summary(self) -> dict:
        rows, cfg = self.pos.rows, self.cfg
        total = sum(r["epoch_s"] for r in rows)
        times = {k: sum(r.get(k, 0.0) for r in rows) for k in ("data_wait_s", "compute_s", "eval_s", "checkpoint_s")}
        run_shares = {k[:-6]: v for k, v in shares(times, total).items()}
        run_shares["compile"] = (self.compile_s or 0.0) / max(total, 1e-9)
        line = verdict(run_shares, backend=self.data.train.backend, better_backend=better_backend(self.plan, self.data),
                       device=self.plan.device.type, amp=cfg["amp"], channels_last=cfg["channels_last"],
                       compile=cfg["compile"], tta=cfg["tta"])
        summary = {"recipe": cfg["recipe"], "epochs": len(rows), "best_val_acc1": self.pos.best,
                   "final_val_acc1": rows[-1]["val_acc1"] if rows else None,
                   "final_val_acc5": rows[-1]["val_acc5"] if rows else None, "train_s": total,
                   "compile_s": self.compile_s, **times, **shares(times, total), "verdict": line,
                   "pretrained": cfg["pretrained"], "pretrained_reason": cfg.get("pretrained_reason"),
                   "writeup_val_acc1": WRITEUP_TOP1.get(cfg["recipe"]), "device": str(self.plan.device),
                   "world_size": self.plan.world}
        if self.plan.main and rows:
            write_json_atomic(self.out / "summary.json", summary)
            report.plot_curves(rows, self.out / "curves.png", f"fasttin {cfg['recipe']}, res {cfg['res']}, "
                               f"{self.plan.device.type}")
            report.console.print(report.closing_table(rows, f"{cfg['recipe']} -> {self.out}"))
            self.plan.say(f"verdict: {line}")
        return summary


def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"


def write_progress(out: Path, epoch: int, step: int, steps_per_epoch: int) -> None:
    """RUN_DIR/progress.json at each logging step: where the run is and rank 0's pid, for tools and
    tests that wait for an event. Replaced by rename, without fsync: it is a hint, not a record."""
    tmp = out / f"progress.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps({"epoch": epoch, "step": step, "steps_per_epoch": steps_per_epoch,
                               "pid": os.getpid(), "time": time.time()}))
    os.replace(tmp, out / "progress.json")


# --- the command ----------------------------------------------------------------------------------

def run(plan: Plan, *, auto_resume: bool = False, overwrite: bool = False, resume: bool = False) -> dict:
    """Run folder, data, model, resume, fit: the whole run, in that order."""
    plan.manifest = read_classes(plan.cfg)
    prepare_folder(plan, resume=resume, auto_resume=auto_resume, overwrite=overwrite)
    if plan.device.type == "cpu" and not torch.cuda.is_available():
        plan.say(CPU_HINT)
    with StopRequest(plan.world, plan.device) as stop:  # from here on a signal stops at a step boundary
        data = open_data(plan)
        step, fresh = build(plan, data)
        pos = restore(plan, step, data)
        if pos.epoch >= plan.cfg["epochs"]:
            plan.say(f"all {pos.epoch} epoch(s) of {plan.out} are done; nothing to train (--epochs N extends it)")
            return {"done": True}
        write_config(plan, data, fresh)
        return Fit(plan, step, data, pos, stop).run()


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    plan = None
    try:
        cfg = settings(args)
        rank, world, device = setup_distributed(args.device)
        plan = Plan(cfg, device, rank, world, explicit_pretrained=args.pretrained is not None)
        summary = run(plan, resume=args.resume, auto_resume=args.auto_resume, overwrite=args.overwrite)
    except (UserError, PretrainedError, CheckpointError, FormatError, MemoryError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except NonFinite as e:
        last = Path(plan.cfg["out"]) / "last.pt"
        kept = f"the last good checkpoint {last} is intact" if last.is_file() else "no checkpoint was saved"
        print(f"{PROG}: stopped: {e}; {kept}", file=sys.stderr)
        return EXIT_NONFINITE
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return EXIT_INTERRUPTED if summary.get("interrupted") else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
