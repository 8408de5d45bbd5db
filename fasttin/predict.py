"""python -m fasttin.predict: top-5 classes of images with a fasttin checkpoint.

Any image PIL reads, of any size, is converted to RGB and resized bicubically to the
checkpoint's resolution. `--split test --data DIR --csv OUT` predicts a whole packed split.
"""
from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from fasttin import checkpoint
from fasttin.checkpoint import CheckpointError
from fasttin.fileio import write_atomic
from fasttin.loaders import make_loader
from fasttin.loaders.augment import normalize
from fasttin.shards import FormatError

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def image_files(paths) -> list[Path]:
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    return files


def load_image(path: Path, res: int) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB").resize((res, res), Image.BICUBIC))
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path}: not an image PIL can read ({e})") from None


@torch.no_grad()
def top5(model, images: torch.Tensor, device) -> tuple[np.ndarray, np.ndarray]:
    """uint8 NHWC -> (top-5 class indices, their probabilities)."""
    x = normalize(images.to(device).permute(0, 3, 1, 2), torch.float32)
    probs = model(x).float().softmax(1)
    p, i = probs.topk(min(5, probs.shape[1]), 1)
    return i.cpu().numpy(), p.cpu().numpy()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fasttin.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, type=Path)
    p.add_argument("inputs", nargs="*", help="image files or folders")
    p.add_argument("--split", help="predict a packed split instead (e.g. test)")
    p.add_argument("--data", type=Path, help="packed data set, with --split")
    p.add_argument("--csv", type=Path, help="write predictions here (file, top-5 wnids, top-1 probability)")
    p.add_argument("--device", choices=["cuda", "cpu"])
    p.add_argument("--batch-size", type=int, default=256)
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        if bool(args.inputs) == bool(args.split):
            raise ValueError("give image files/folders, or --split with --data, not both")
        ckpt = checkpoint.load(args.ckpt)
        model = checkpoint.restore_model(ckpt, device)
        res = ckpt["arch"].get("res", 64)
        wnids = ckpt.get("classes") or [str(i) for i in range(ckpt["arch"]["num_classes"])]
        words = ckpt.get("words") or [""] * len(wnids)
        rows = []
        if args.split:
            if args.data is None:
                raise ValueError("--split needs --data")
            loader = make_loader(args.data, args.split, backend="pil" if device.type == "cpu" else "auto", res=res,
                                 batch_size=args.batch_size, device=device, shuffle=False, drop_last=False,
                                 dtype=torch.float32, return_index=True)
            if loader.ds.classes != wnids:
                raise CheckpointError(f"{args.ckpt} was trained on other classes than {args.data}")
            for x, _, index in loader:
                with torch.no_grad():
                    probs = model(x).float().softmax(1)
                pr, ix = probs.topk(5, 1)
                for i, idx, pp in zip(index.tolist(), ix.cpu().numpy(), pr.cpu().numpy()):
                    rows.append((loader.ds.keys[i], [wnids[k] for k in idx], float(pp[0])))
        else:
            files = image_files(args.inputs)
            for start in range(0, len(files), args.batch_size):
                chunk = files[start:start + args.batch_size]
                batch = torch.from_numpy(np.stack([load_image(f, res) for f in chunk]))
                ix, pr = top5(model, batch, device)
                for f, idx, pp in zip(chunk, ix, pr):
                    rows.append((str(f), [wnids[k] for k in idx], float(pp[0])))
                    if not args.csv:
                        print(f"{f}: " + "; ".join(f"{wnids[k]} {words[k].split(',')[0]} ({q:.1%})"
                                                   for k, q in zip(idx, pp)))
    except (CheckpointError, FormatError, FileNotFoundError, ValueError) as e:
        print(f"fasttin.predict: error: {e}", file=sys.stderr)
        return 2
    if args.csv:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["file", "top1", "top2", "top3", "top4", "top5", "p_top1"])
        for name, top, p1 in rows:
            w.writerow([name, *top, f"{p1:.4f}"])
        write_atomic(args.csv, buf.getvalue().encode())
        print(f"wrote {len(rows)} predictions to {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
