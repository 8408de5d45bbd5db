"""python -m fasttin.eval: top-1 and top-5 of a checkpoint on a packed split, at any resolution.

Evaluating the seed-224 model at --res 64 reproduces the write-up's "224 model at 64" experiment.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from fasttin import checkpoint
from fasttin.checkpoint import CheckpointError
from fasttin.fileio import write_json_atomic
from fasttin.loaders import BACKENDS, make_loader
from fasttin.loop import evaluate
from fasttin.pack import DEFAULT_OUT
from fasttin.shards import FormatError, read_manifest


def evaluate_checkpoint(ckpt_path, data, *, split="val", res=None, device=None, backend="auto", batch_size=256,
                        amp="bf16", tta=False, workers=None) -> dict:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ckpt = checkpoint.load(Path(ckpt_path))
    manifest = read_manifest(data)
    checkpoint.check_fits(ckpt, len(manifest["classes"]), where=str(ckpt_path))
    if ckpt.get("classes") and ckpt["classes"] != [c["wnid"] for c in manifest["classes"]]:
        raise CheckpointError(f"{ckpt_path} was trained on other classes (or another order) than {data}")
    res = res or ckpt["arch"].get("res", 64)
    model = checkpoint.restore_model(ckpt, device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": torch.float32}[amp]
    loader = make_loader(data, split, backend=backend, res=res, batch_size=batch_size, device=device,
                         shuffle=False, drop_last=False, dtype=dtype, workers=workers)
    if (loader.ds.labels < 0).all():
        raise ValueError(f"split {split!r} has no labels to score against (use fasttin.predict)")
    m = evaluate(model, loader, device=device, amp=amp, tta=tta)
    return {"checkpoint": str(ckpt_path), "split": split, "res": res, "top1": m["acc1"], "top5": m["acc5"],
            "loss": m["loss"], "images": m["n"], "trained_res": ckpt["arch"].get("res"),
            "stem": ckpt["arch"]["stem"], "tta": tta}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fasttin.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, type=Path, help="a fasttin checkpoint (best.pt or last.pt)")
    p.add_argument("--data", type=Path, default=DEFAULT_OUT, help="packed data set")
    p.add_argument("--split", default="val", help="split to score (default val)")
    p.add_argument("--res", type=int, help="resolution (default: the one the checkpoint was trained at)")
    p.add_argument("--device", choices=["cuda", "cpu"])
    p.add_argument("--backend", choices=BACKENDS, default="auto")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--amp", choices=["bf16", "fp16", "off"], default="bf16")
    p.add_argument("--tta", action="store_true", help="average with the mirrored images' logits")
    p.add_argument("--json", type=Path, help="also write the result here")
    args = p.parse_args(argv)
    try:
        if args.res is not None and args.res < 16:
            raise ValueError(f"--res {args.res}: at least 16")
        r = evaluate_checkpoint(args.ckpt, args.data, split=args.split, res=args.res, device=args.device,
                                backend=args.backend, batch_size=args.batch_size, amp=args.amp, tta=args.tta)
    except (CheckpointError, FormatError, FileNotFoundError, ValueError, MemoryError) as e:
        print(f"fasttin.eval: error: {e}", file=sys.stderr)
        return 2
    t = Table(title=f"{args.ckpt} on {args.split} at res {r['res']}")
    for k in ("images", "top-1", "top-5", "loss"):
        t.add_column(k, justify="right")
    t.add_row(f"{r['images']:,}", f"{r['top1']:.2%}", f"{r['top5']:.2%}", f"{r['loss']:.4f}")
    Console(width=None if sys.stdout.isatty() else 120).print(t)
    if args.json:
        write_json_atomic(args.json, r)
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
