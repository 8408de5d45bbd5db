"""python -m fasttin.predict: top-5 classes of images with a fasttin checkpoint.

Any image PIL reads, of any size, is converted to 8-bit RGB as the packer converts it (16-bit
scaled, transparency composited on black, float modes refused; `fasttin.pack.rgb8`) and resized
bicubically to the checkpoint's resolution. `--split test --data DIR --csv OUT` predicts a whole packed split
(without --csv, the CSV goes to stdout).

Names that come from the data (a packed split's sample names, file names found in a folder) are
only written into the CSV or printed (escaped when they hold control characters); they are never
opened or used as paths to write to. The CSV's folder is checked (and created) before any work,
and if the CSV cannot be written at the end the predictions go to stdout instead. The CSV may not
be the checkpoint, an input image or a file inside --data: it would destroy what it is made from.
"""
from __future__ import annotations

import csv
import io
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from fasttin.errors import EXIT_OK, CommandParser, UserError, interrupt_on_sigterm, run_command, shown
from fasttin.fileio import ensure_writable, refuse_output_over_inputs, write_atomic
from fasttin.info import resolve_device
from fasttin.loaders import make_loader
from fasttin.loaders.augment import normalize
from fasttin.model import from_checkpoint
from fasttin.pack import rgb8
from fasttin.recipes import count
from fasttin.shards import check_split, read_manifest

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# what PIL raises for a file it cannot read: not an image, cut short, a broken chunk, too many pixels
PIL_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class ImageError(UserError):
    """An input image PIL cannot read (or one so large it looks like a decompression bomb)."""


def convertible(im: Image.Image) -> str | None:
    """Why `rgb8` refuses images of `im`'s pixel mode (None: it converts them), from the header only."""
    try:
        return rgb8(Image.new(im.mode, (1, 1)))[1]
    except (ValueError, OSError):  # a mode PIL reads but cannot create: rgb8 would not know it either
        return f"has pixel mode {im.mode}, which has no defined 8-bit RGB conversion"


def image_files(paths) -> list[Path]:
    """The image files named, and those under the folders named; each one's header is read now,
    so a file that is no image, or one whose pixel mode has no 8-bit RGB, fails before any
    prediction is made, and so does a folder holding no image."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
            if not found:
                raise UserError(f"{shown(str(p))}: no images in this folder (looked for "
                                f"{', '.join(sorted(IMAGE_SUFFIXES))})")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"{shown(str(p))}: no such file or folder")
    for f in files:
        try:
            with Image.open(f) as im:
                why = convertible(im)
        except PIL_ERRORS as e:
            raise ImageError(f"{shown(str(f))}: not an image PIL can read ({e})") from None
        if why:
            raise ImageError(f"{shown(str(f))}: {why}")
    return files


def load_image(path: Path, res: int) -> np.ndarray:
    """uint8 [res, res, 3]: the image converted to RGB exactly as the packer converts it (`rgb8`),
    then resized bicubically, so a prediction sees what training saw."""
    try:
        with warnings.catch_warnings(), Image.open(path) as im:
            warnings.simplefilter("ignore")  # PIL's per-image warnings would break the one-line report
            im.load()
            rgb, why = rgb8(im)
    except PIL_ERRORS as e:
        raise ImageError(f"{shown(str(path))}: not an image PIL can read ({e})") from None
    if why:
        raise ImageError(f"{shown(str(path))}: {why}")
    return np.asarray(Image.fromarray(rgb).resize((res, res), Image.BICUBIC))


@torch.no_grad()
def top5(model, images: torch.Tensor, device) -> tuple[np.ndarray, np.ndarray]:
    """uint8 NHWC -> (top-5 class indices, their probabilities)."""
    x = normalize(images.to(device).permute(0, 3, 1, 2), torch.float32)
    probs = model(x).float().softmax(1)
    p, i = probs.topk(min(5, probs.shape[1]), 1)
    return i.cpu().numpy(), p.cpu().numpy()


def predict_files(model, files, *, res, wnids, words, device, batch_size, echo) -> list[tuple]:
    """(file name, top-5 wnids, top-1 probability) per image; printed as it goes when `echo`."""
    rows = []
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        ix, pr = top5(model, torch.from_numpy(np.stack([load_image(f, res) for f in chunk])), device)
        for f, idx, pp in zip(chunk, ix, pr):
            rows.append((str(f), [wnids[k] for k in idx], float(pp[0])))
            if echo:
                print(f"{shown(str(f))}: " + "; ".join(f"{wnids[k]} {words[k].split(',')[0]} ({q:.1%})"
                                                        for k, q in zip(idx, pp)))
    return rows


@torch.no_grad()
def predict_split(model, data: Path, split: str, manifest: dict, *, res, wnids, device, batch_size) -> list[tuple]:
    """(sample name, top-5 wnids, top-1 probability) for every sample of a packed split."""
    check_split(manifest, data, split)
    loader = make_loader(data, split, backend="pil" if device.type == "cpu" else "auto", res=res,
                         batch_size=batch_size, device=device, shuffle=False, drop_last=False,
                         dtype=torch.float32, return_index=True, verify=True)
    rows = []
    for x, _, index in loader:
        pr, ix = model(x).float().softmax(1).topk(min(5, len(wnids)), 1)
        for i, idx, pp in zip(index.tolist(), ix.cpu().numpy(), pr.cpu().numpy()):
            rows.append((loader.ds.keys[i], [wnids[k] for k in idx], float(pp[0])))
    return rows


def csv_text(rows) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["file", "top1", "top2", "top3", "top4", "top5", "p_top1"])
    for name, top, p1 in rows:
        w.writerow([name, *top, *[""] * (5 - len(top)), f"{p1:.4f}"])
    return buf.getvalue()


def parser() -> CommandParser:
    p = CommandParser("fasttin.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, type=Path)
    p.add_argument("inputs", nargs="*", help="image files or folders")
    p.add_argument("--split", help="predict a packed split instead (e.g. test)")
    p.add_argument("--data", type=Path, help="packed data set, with --split")
    p.add_argument("--csv", type=Path, help="write predictions here (file, top-5 wnids, top-1 probability)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when there is one)")
    p.add_argument("--batch-size", type=count("batch_size"), default=256)
    return p


def predict(args) -> list[tuple]:
    """The predictions the flags ask for; UserError for anything wrong with them, before the work."""
    if bool(args.inputs) == bool(args.split):
        raise UserError("give image files/folders, or --split with --data, not both")
    if args.split and args.data is None:
        raise UserError("--split needs --data")
    files = [] if args.split else image_files(args.inputs)
    if args.csv:
        refuse_output_over_inputs("--csv", args.csv, files=[("the --ckpt", args.ckpt)] + [
            ("the input image", f) for f in files], folders=[("the --data folder", args.data)] if args.split else [])
        ensure_writable(args.csv)
    device = resolve_device(args.device)
    if args.split:
        manifest = read_manifest(args.data)
        t = from_checkpoint(args.ckpt, device, classes=[c["wnid"] for c in manifest["classes"]], data=args.data)
        return predict_split(t.model, args.data, args.split, manifest, res=t.res, wnids=t.wnids, device=device,
                             batch_size=args.batch_size)
    t = from_checkpoint(args.ckpt, device)
    return predict_files(t.model, files, res=t.res, wnids=t.wnids, words=t.words, device=device,
                         batch_size=args.batch_size, echo=not args.csv)


def main(argv=None) -> int:
    args = parser().parse_args(argv)

    def body() -> int:
        rows = predict(args)
        if args.csv:
            text = csv_text(rows)
            try:
                write_atomic(args.csv, text.encode())
            except UserError as e:
                sys.stdout.write(text)  # computed predictions are never thrown away
                raise UserError(f"{e} (the predictions are printed above)") from None
            print(f"wrote {len(rows)} predictions to {args.csv}")
        elif args.split:  # the split's predictions were computed: without --csv they go to stdout, as CSV
            sys.stdout.write(csv_text(rows))
        return EXIT_OK
    interrupt_on_sigterm()  # kill, timeout, Slurm: "interrupted", exit 130, as Ctrl-C
    return run_command("fasttin.predict", body, interrupted="no CSV written")


if __name__ == "__main__":
    sys.exit(main())
