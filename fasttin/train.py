"""python -m fasttin.train: ResNet18 on packed Tiny-ImageNet, one recipe per command.

Reads top to bottom: flags -> settings -> run folder (fresh, resume or refuse) -> data -> model
-> (resume) -> fit: epochs of train(); validate(); save_checkpoint() -> summary and verdict; on one
GPU, on several under torchrun (DDP over the loaders' rank split), or on the CPU. Exit codes:
docs/GUARANTEES.md.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fasttin import checkpoint, ranks, recipes, report, rundir, tuning
from fasttin.errors import EXIT_INTERRUPTED, EXIT_OK, run_command
from fasttin.fileio import release_claims
from fasttin.info import resolve_device
from fasttin.loaders import better_backend, make_loader
from fasttin.loop import AMP_DTYPE, Budget, NonFinite, StepClock, evaluate, make_step, train_epoch
from fasttin.model import build_model, check_fits, initial_weights
from fasttin.profiling import StepProfiler
from fasttin.ranks import StopRequest
from fasttin.shards import read_manifest

NAME = "fasttin.train"


# --- the run and its folder -----------------------------------------------------------------------

@dataclass
class Run:
    """This invocation's context: settings, processes, whether it resumes, the data's manifest."""
    cfg: dict
    device: torch.device
    rank: int = 0
    world: int = 1
    resume: bool = False
    omitted: frozenset = frozenset()  # settings left off the command line: a resume keeps the run's
    manifest: dict = field(default_factory=dict)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def out(self) -> Path:
        return Path(self.cfg["out"])

    def log(self, message: str | None) -> None:
        """A log line on rank 0, if any (one line whatever its length; a path in it is never markup)."""
        if self.main and message:
            report.log(message)


# --- data and model -------------------------------------------------------------------------------

@dataclass
class Data:
    train: object
    val: object
    classes: list
    words: list


def open_data(run: Run) -> Data:
    """Train drops its last partial batch; val is whole, padded across ranks and the padding masked.
    Both are built for the largest resolution they will hand out (the memory check), then set per epoch."""
    cfg, world = run.cfg, run.world
    recipes.check_batch(cfg, world, run.manifest["splits"].get("train", {}).get("count", cfg["batch_size"]),
                        cfg["data"])
    common = dict(backend=cfg["backend"], device=run.device, seed=cfg["seed"], rank=run.rank, world_size=world,
                  dtype=AMP_DTYPE[cfg["amp"]], workers=cfg["workers"], batch_size=cfg["batch_size"] // world,
                  verify=True)
    top = recipes.max_res(cfg)
    train = make_loader(cfg["data"], "train", augment=cfg["augment"], shuffle=True, drop_last=True, res=top, **common)
    val = make_loader(cfg["data"], "val", augment="none", shuffle=False, drop_last=False,
                      res=max(top, cfg["eval_res"]), **common)
    classes = run.manifest["classes"]
    res = cfg["res_schedule"] and f"{cfg['res']} then {cfg['res_schedule']}" or cfg["res"]
    run.log(f"data: {len(train.ds):,} train / {len(val.ds):,} val images, {len(classes)} classes, backend "
            f"{train.backend}, res {res}, global batch {cfg['batch_size']} on {world} process(es) of {run.device.type}")
    return Data(train, val, [c["wnid"] for c in classes], [c["words"] for c in classes])


def build(run: Run, data: Data):
    """(TrainStep, the names of the freshly initialised tensors)."""
    torch.manual_seed(run.cfg["seed"])
    model = build_model(len(data.classes), run.cfg["stem"])
    fresh = [] if run.resume else initial_weights(model, run.cfg, log=run.log,
                                                       explicit="pretrained" not in run.omitted)
    step = make_step(model, run.cfg, device=run.device, steps_per_epoch=len(data.train), world=run.world)
    run.log(step.ema and step.ema.inert_note(run.cfg["epochs"] * len(data.train)))  # an EMA too slow to matter
    return step, fresh


# --- resume ---------------------------------------------------------------------------------------

def restore(run: Run, step, data: Data) -> checkpoint.Position:
    """The last checkpoint's state and position, and metrics only up to it (no epoch repeated or skipped)."""
    metrics, where = run.out / "metrics.jsonl", run.out / "last.pt"
    if not run.resume:
        if run.main:
            report.write_metrics(metrics, [])
        return checkpoint.Position()
    ckpt = checkpoint.load(where)
    check_fits(ckpt, len(data.classes), run.cfg["stem"], where=str(where))
    step.load_state_dict(ckpt, where)
    checkpoint.set_rng_state(ckpt["rng"])
    pos = checkpoint.Position.of(ckpt)
    pos.rows = report.metrics_upto(metrics, pos.rows_seen, pos.epoch, rewrite=run.main)
    run.log(f"resumed from {where}: {pos.describe(run.cfg['budget'])}")
    return pos


# --- fit: train(); validate(); save_checkpoint() --------------------------------------------------

def epoch_res(run: Run, step, epoch: int, pos: checkpoint.Position, budget: Budget | None) -> int:
    """The schedule's resolution for the epoch (under --budget, the epoch the clock has reached), or
    for an epoch resumed midway, the one it started at."""
    if pos.epoch_res and epoch == pos.epoch and pos.batch:
        return pos.epoch_res
    at = epoch if budget is None else int(step.position() // step.steps_per_epoch)
    return recipes.res_at(run.cfg, at)


def train(run: Run, step, data: Data, epoch: int, first: int, res: int, *, clock, stop, budget, on_log, profiler,
          carry=None):
    """The epoch's batches at `res` from batch `first` on (the metrics' sums of those before: `carry`),
    until its end, a signal or the budget's end."""
    data.train.set_res(res)
    data.train.set_epoch(epoch, first)
    return train_epoch(step, data.train, clock=clock, log_every=run.cfg["log_every"], on_log=on_log,
                       should_stop=lambda: stop.should_stop() or bool(budget and budget.exhausted()),
                       on_step=profiler.on_step if profiler else None,
                       carry=carry if run.main else None)  # rank 0's share holds the whole of it


def validate(run: Run, step, data: Data, res: int) -> dict:
    """Top-1/top-5 of the raw weights, and of the EMA beside them (keys prefixed ema_)."""
    cfg = run.cfg
    data.val.set_res(cfg["eval_res"] or res)
    how = dict(device=run.device, amp=cfg["amp"], tta=cfg["tta"], channels_last=cfg["channels_last"],
               pad_to=data.val.batch_size if cfg["compile"] else 0)  # compiled: the last batch, no recompile
    out = evaluate(step.net, data.val, **how)
    if step.ema is not None:
        ema = evaluate(step.ema.model, data.val, **how)
        out.update({f"ema_{k}": v for k, v in ema.items()})
    return out


def save_checkpoint(run: Run, step, data: Data, pos: checkpoint.Position, saver: checkpoint.Saver, *, epoch: int,
                    batch: int, res: int, budget: dict | None, best: str | None = None,
                    partial: dict | None = None) -> None:
    """last.pt (with the `partial` epoch's sums and times at a stop within it), and best.pt when
    `best` names the weights that validated best (rank 0's: checkpoint.save_run), written by
    `saver` in the background while the next epoch trains."""
    if run.main:
        checkpoint.save_run(run.out, step, pos, run.cfg, data.classes, data.words, epoch=epoch, batch=batch,
                            res=res, budget=budget, best=best, partial=partial, saver=saver)


def fit(run: Run, step, data: Data, pos: checkpoint.Position, stop: StopRequest, budget: Budget | None) -> dict:
    """The epochs of this invocation: train(); validate(); save_checkpoint(); until the last epoch,
    or under --budget the clock's end; a signal stops it at a step boundary, its position saved."""
    cfg, steps_per_epoch = run.cfg, len(data.train)
    if budget:
        budget.start_clock()
        step.position = budget.position
    clock = StepClock(run.device)
    profiler = run.main and cfg["profile"] and StepProfiler(cfg["profile"], run.out, run.device,
                                                            log=run.log).attach(step)
    epoch, compile_s = pos.epoch, None
    ended = False  # run_training returned for a run with nothing left: a fresh --budget run takes a step at least
    with report.LiveView(run.main, run.out, steps_per_epoch, cfg["batch_size"], cfg["epochs"], cfg["budget"],
                         run.log, pos.budget_spent_s) as live, checkpoint.Saver() as saver:
        while not ended:
            res, first = epoch_res(run, step, epoch, pos, budget), pos.batch
            carry = pos.partial if first else None  # the part of this epoch a stopped process did
            t0 = time.perf_counter() - clock.carry(carry)
            lr = step.lr_at(step.position()) if budget else step.epoch_lr(epoch)
            live.start_epoch(epoch, first, carried=clock.totals)

            def on_log(n, m):  # the logging steps (which synchronise anyway): the view, then the ranks agree
                live.step(epoch, first, n, m["loss"], clock.totals)
                stop.decide()
                if budget:
                    budget.share_clock()
            m, steps = train(run, step, data, epoch, first, res, clock=clock, stop=stop, budget=budget,
                             on_log=on_log, profiler=profiler, carry=carry and carry["sums"])
            done, counted = first + steps, first + steps if carry else steps  # the steps the sums and times cover
            if stop.should_stop() and done < steps_per_epoch and not (budget and budget.exhausted()):
                step.ensure_finite(epoch)
                save_checkpoint(run, step, data, pos, saver, epoch=epoch, batch=done, res=res,
                                budget=budget.figures() if budget else None,
                                partial={"sums": m["sums"], **clock.take(), "epoch_s": time.perf_counter() - t0})
                saver.wait()
                run.log(f"{stop.name}: saved {run.out / 'last.pt'} at batch {done} of epoch {epoch + 1}; "
                        "--resume continues from there")
                return {"interrupted": True}
            if steps % cfg["log_every"]:  # an epoch shorter than the cadence still reports (rate, progress)
                on_log(steps, m)
            t1 = time.perf_counter()
            times = clock.take(spanning=t1 - t0)  # the epoch's four parts add up to its wall time
            compile_s = clock.first_compute_s if cfg["compile"] and compile_s is None else compile_s
            val = validate(run, step, data, res)
            t2 = time.perf_counter()
            times["eval_s"] = t2 - t1
            row = report.epoch_row(epoch, m, val, times, lr=lr, res=res, val_res=cfg["eval_res"] or res, steps=counted,
                                   batches=done, batch_size=cfg["batch_size"],
                                   compile_s=compile_s if epoch == pos.epoch else None)
            step.ensure_finite(epoch)  # before its row or a checkpoint is written
            best = pos.record(row, val)
            report.time_row(row, pos.rows, t0, t2)  # until the save is timed (a crash before it keeps these)
            # decided once, before the save: last.pt and the row keep the figures it was decided by
            ended = budget.close_epoch(row, counted) if budget else epoch + 1 >= cfg["epochs"]
            if run.main:
                report.write_metrics(run.out / "metrics.jsonl", pos.rows)  # first: a crash now only repeats the epoch
            complete = done == steps_per_epoch
            save_checkpoint(run, step, data, pos, saver, epoch=epoch + complete, batch=0 if complete else done,
                            res=res, budget=budget.figures(row) if budget else None, best=best)
            if ended or (budget and not saver.longest_s):  # the last save is the run's; a budget times one whole
                saver.wait()
            report.time_row(row, pos.rows, t0, t2)
            if budget:
                budget.saved(max(row["checkpoint_s"], saver.longest_s))
            if run.main:
                report.write_metrics(run.out / "metrics.jsonl", pos.rows)
                live.end_epoch(row)
            epoch += 1
            if ended:
                if stop.should_stop():
                    run.log(f"{stop.name} after the last epoch: the run is complete")
            elif stop.decide():
                run.log(f"{stop.name}: stopped after epoch {epoch}; --resume continues")
                return {"interrupted": True}
    if profiler:
        profiler.finish()
    return finish(run, data, pos, compile_s, budget)


def finish(run: Run, data: Data, pos: checkpoint.Position, compile_s, budget: Budget | None) -> dict:
    """The summary on every rank; rank 0 writes summary.json, curves.png, the closing table and the verdict."""
    return report.finish_run(run.out if run.main else None, pos.rows, run.cfg, budget=budget, best=pos.best,
                             best_weights=pos.best_weights, compile_s=compile_s, device=run.device, world=run.world,
                             steps_per_epoch=len(data.train), backend=data.train.backend,
                             better_backend=better_backend(data.train, recipes.max_res(run.cfg)))


# --- the command ----------------------------------------------------------------------------------

def run_training(run: Run, *, auto_resume: bool = False, overwrite: bool = False, resume: bool = False) -> dict:
    """Run folder, data, model, resume, fit: the whole run, in that order."""
    run.manifest = read_manifest(run.cfg["data"])
    run.cfg["classes"] = [c["wnid"] for c in run.manifest["classes"]]
    run.resume, notes = rundir.prepare_ranks(run.out, run.cfg, resume=resume, auto_resume=auto_resume,
                                             overwrite=overwrite, omitted=run.omitted, rank=run.rank, world=run.world)
    decision = tuning.choose_ranks(run.cfg, run.device, rank=run.rank, world=run.world, log=run.log)
    run.cfg.update(decision.values, chosen=decision.why)  # config.json records why
    if run.device.type == "cpu" and not torch.cuda.is_available():
        run.log(tuning.cpu_hint(run.cfg))
    with StopRequest(run.world, run.device) as stop:  # from here on a signal stops at a step boundary
        data = open_data(run)
        step, fresh = build(run, data)
        pos = restore(run, step, data)
        budget = Budget.resumed(run.cfg["budget"], run.cfg["epochs"] * len(data.train), pos, world=run.world,
                                device=run.device, sync_every=run.cfg["log_every"]) if run.cfg["budget"] else None
        spent = run.resume and budget is not None and budget.exhausted()
        if pos.epoch >= run.cfg["epochs"] and budget is None or spent:
            run.log(f"its budget is spent after {len(pos.rows)} epoch(s); nothing to train in {run.out}" if spent
                    else f"all {pos.epoch} epoch(s) of {run.out} are done; nothing to train (--epochs N extends it)")
            if pos.rows and not (run.out / "summary.json").is_file():  # it stopped after its last save
                finish(run, data, pos, None, budget)
            return {"done": True}
        for note in notes:  # rank 0's decision (or refusal), shared with every rank: it trains on
            run.log(note)
        if run.main:
            (run.out / "summary.json").unlink(missing_ok=True)  # a finished run's, extended: written at its end
            rundir.write_config(run.out, run.cfg, world_size=run.world, device=str(run.device),
                                num_classes=len(data.classes), fresh_init=fresh)
        try:
            return fit(run, step, data, pos, stop, budget)
        except NonFinite as e:
            raise NonFinite(f"{e}; {checkpoint.kept(run.out)}") from None


def main(argv=None) -> int:
    args = recipes.train_parser(__doc__.split("\n\n")[0]).parse_args(argv)

    def body() -> int:
        try:
            cfg = recipes.settings(args)
            rank, world, device = ranks.setup(resolve_device(args.device).type == "cuda")
            run = Run(cfg, device, rank, world, omitted=frozenset(k for k in ("epochs", "pretrained")
                                                                  if getattr(args, k) is None))
            summary = run_training(run, resume=args.resume, auto_resume=args.auto_resume, overwrite=args.overwrite)
            ranks.teardown(together=True)
        finally:
            ranks.teardown()
            release_claims()  # the run folder (rundir.prepare claimed it)
        return EXIT_INTERRUPTED if summary.get("interrupted") else EXIT_OK
    return run_command(NAME, body)


if __name__ == "__main__":
    sys.exit(main())
