"""python -m fasttin.eval: top-1 and top-5 of a checkpoint on a packed split, at any resolution.

Evaluating the seed-224 model at --res 64 reproduces the write-up's "224 model at 64" experiment.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fasttin import tuning
from fasttin.errors import EXIT_OK, CommandParser, UserError, interrupt_on_sigterm, run_command
from fasttin.fileio import ensure_writable, refuse_output_over_inputs, write_json_atomic
from fasttin.info import resolve_device
from fasttin.loaders import BACKENDS, make_loader
from fasttin.loop import AMP_DTYPE as AMP
from fasttin.loop import evaluate
from fasttin.model import from_checkpoint
from fasttin.recipes import AMPS, AUTO, DEFAULT_DATA, count, res_problem
from fasttin.shards import check_split, read_manifest

AMP_CHOICES = (AUTO, *AMPS)


def evaluate_checkpoint(ckpt_path, data, *, split="val", res=None, device=None, backend="auto", batch_size=256,
                        amp="auto", tta=False, workers=None) -> dict:
    """Top-1/top-5 of the checkpoint at `ckpt_path` on `split` of the packed data set `data`.
    Everything a user can get wrong (a hostile or foreign checkpoint, other classes, a bad device
    or split) is a UserError, raised before the evaluation starts."""
    if res is not None and res_problem(res):
        raise UserError(f"--res {res}: {res_problem(res)}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: a positive integer")
    if amp not in AMP_CHOICES or backend not in BACKENDS:
        raise UserError(f"amp {amp!r} / backend {backend!r}: choose amp from {AMP_CHOICES}, backend from {BACKENDS}")
    device = resolve_device(device)
    decision = tuning.choose(amp, None, device)  # "auto": the trainer's choice on this machine, and its layout
    for line in decision.warnings:
        print(f"fasttin.eval: {line}", file=sys.stderr)
    amp = decision.values["amp"]
    manifest = read_manifest(data)
    trained = from_checkpoint(ckpt_path, device, classes=[c["wnid"] for c in manifest["classes"]], data=data,
                              channels_last=decision.values["channels_last"])
    check_split(manifest, data, split)
    res = res or trained.res
    loader = make_loader(data, split, backend=backend, res=res, batch_size=batch_size, device=device, verify=True,
                         shuffle=False, drop_last=False, dtype=AMP[amp], workers=workers)
    if (loader.ds.labels < 0).all():
        raise UserError(f"split {split!r} has no labels to score against (use fasttin.predict)")
    m = evaluate(trained.model, loader, device=device, amp=amp, tta=tta, channels_last=decision.values["channels_last"])
    return {"checkpoint": str(ckpt_path), "split": split, "res": res, "top1": m["acc1"], "top5": m["acc5"],
            "loss": m["loss"], "images": m["n"], "trained_res": trained.arch.get("res"),
            "stem": trained.arch["stem"], "tta": tta, "amp": amp, "chosen": decision.why}


def parser() -> CommandParser:
    p = CommandParser("fasttin.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, type=Path, help="a fasttin checkpoint (best.pt or last.pt)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="packed data set")
    p.add_argument("--split", default="val", help="split to score (default val)")
    p.add_argument("--res", type=count("res"), help="resolution (default: the one the checkpoint was trained at)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when there is one)")
    p.add_argument("--backend", choices=BACKENDS, default="auto")
    p.add_argument("--batch-size", type=count("batch_size"), default=256)
    p.add_argument("--amp", choices=AMP_CHOICES, default=AUTO,
                   help="autocast precision (auto: the device's fast one, as fasttin.train chooses it)")
    p.add_argument("--tta", action="store_true", help="average with the mirrored images' logits")
    p.add_argument("--json", type=Path, help="also write the result here (its folder is created)")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)

    def body() -> int:
        if args.json:  # before the work, not after it; never over the checkpoint or into the pack
            refuse_output_over_inputs("--json", args.json, files=[("the --ckpt", args.ckpt)],
                                      folders=[("the --data folder", args.data)])
            ensure_writable(args.json)
        r = evaluate_checkpoint(args.ckpt, args.data, split=args.split, res=args.res, device=args.device,
                                backend=args.backend, batch_size=args.batch_size, amp=args.amp, tta=args.tta)
        t = Table(title=f"{args.ckpt} on {args.split} at res {r['res']}")
        for k in ("images", "top-1", "top-5", "loss"):
            t.add_column(k, justify="right")
        t.add_row(f"{r['images']:,}", f"{r['top1']:.2%}", f"{r['top5']:.2%}", f"{r['loss']:.4f}")
        Console(width=None if sys.stdout.isatty() else 120).print(t)
        print(json.dumps(r), flush=True)  # the result is out before the file write can fail
        if args.json:
            try:
                write_json_atomic(args.json, r)
            except UserError as e:
                raise UserError(f"{e} (the result is printed above)") from None
        return EXIT_OK
    interrupt_on_sigterm()  # kill, timeout, Slurm: "interrupted", exit 130, as Ctrl-C
    return run_command("fasttin.eval", body, interrupted="no result written")


if __name__ == "__main__":
    sys.exit(main())
