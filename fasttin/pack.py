"""python -m fasttin.pack: Tiny-ImageNet (zip, folder, download or synthetic) -> dense binary shards.

Every image is decoded once to prove it is readable and 64x64; JPEGs a GPU decoder reads are
stored untouched, anything else (PNG under a .JPEG name, CMYK) is re-encoded as RGB JPEG q95
4:4:4. Shards are written under temporary names and renamed, the manifest last, so an
interrupted pack never looks complete.
"""
from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image

from fasttin import __version__
from fasttin.fileio import digest, write_json_atomic
from fasttin.shards import (
    FORMAT_NAME,
    FORMAT_VERSION,
    IMAGE_SHAPE,
    MANIFEST,
    FormatError,
    ShardWriter,
    open_split,
    read_manifest,
)
from fasttin.source import SPLITS, Source, SourceError, download_official
from fasttin.synthetic import make_layout

DEFAULT_OUT = Path(os.environ.get("FASTTIN_DATA", "data/tiny-imagenet-200-packed"))


class PackError(Exception):
    """Packing refused: the message names every culprit."""


def check_image(data: bytes, payload: str) -> tuple[bytes | None, bool, str | None]:
    """(bytes to store, converted?, error). Decodes once: the proof the image is usable."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            fmt, mode, size = im.format, im.mode, im.size
            if size != IMAGE_SHAPE[:2]:
                return None, False, f"is {size[0]}x{size[1]}, not 64x64"
            gpu_readable = fmt == "JPEG" and mode in ("RGB", "L")
            if payload == "raw":
                return np.asarray(im.convert("RGB")).tobytes(), not gpu_readable, None
            if gpu_readable:
                return data, False, None
            out = io.BytesIO()
            im.convert("RGB").save(out, "JPEG", quality=95, subsampling=0)
            return out.getvalue(), True, None
    except Exception as e:  # PIL raises many kinds for corrupt, truncated or non-image data
        return None, False, f"does not decode ({type(e).__name__}: {e})"


_SRC: Source | None = None


def _init_worker(src: Source):
    global _SRC
    _SRC = src


def _work(task):
    members, payload = task
    return [check_image(_SRC.read(m), payload) for m in members]


def is_complete(out: Path) -> bool:
    try:
        read_manifest(out)
        return True
    except (FileNotFoundError, FormatError):
        return False


def pack(src: str | Path | None, out: str | Path, *, payload: str = "jpeg", classes: int | None = None,
         per_class: int | None = None, shard_mb: float = 64, seed: int = 0, workers: int | None = None,
         skip_bad: bool = False, force: bool = False, synthetic: int | None = None,
         quiet: bool = False) -> dict:
    """Pack a source into `out`; returns the manifest. Raises PackError/SourceError on bad input."""
    out = Path(out)
    options = {"payload": payload, "classes": classes, "per_class": per_class, "shard_mb": shard_mb,
               "seed": seed, "skip_bad": skip_bad, "synthetic": synthetic}
    if is_complete(out) and not force:
        old = read_manifest(out)
        if old.get("options") != options:
            raise PackError(f"{out} already holds a data set packed with other options "
                            f"({old.get('options')}); use --force to replace it")
        if not quiet:
            print(f"{out} is already packed (manifest.json present); nothing to do (--force repacks)")
        return old
    if payload not in ("jpeg", "raw"):
        raise PackError(f"--format {payload!r}: choose jpeg or raw")
    if synthetic is not None:
        with tempfile.TemporaryDirectory(prefix="fasttin-synth-") as tmp:
            root = make_layout(tmp, classes or 200, synthetic, seed=seed)
            # the synthetic layout has exactly `classes` classes: not a subset, so test stays
            return _pack(Source(root), out, options, None, per_class, shard_mb, seed, workers, skip_bad,
                         quiet, source_info={"kind": "synthetic", "per_class": synthetic, "classes": classes or 200})
    if src is None:
        src = download_official()
    source = Source(src)
    if source.kind == "folder" and out.resolve().is_relative_to(source.root.resolve()):
        raise PackError(f"--out {out} is inside --src {source.root}: refusing to write into the source")
    return _pack(source, out, options, classes, per_class, shard_mb, seed, workers, skip_bad, quiet)


def _pack(source, out, options, classes, per_class, shard_mb, seed, workers, skip_bad, quiet, source_info=None):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn
    from rich.table import Table

    console = Console(stderr=True, quiet=quiet)
    t_all = time.perf_counter()
    layout = source.layout(classes, per_class)
    workers = workers or os.cpu_count() or 1
    out.mkdir(parents=True, exist_ok=True)
    for stale in [out / MANIFEST, *out.glob("*.shard"), *out.glob("*.shard.tmp*")]:
        stale.unlink(missing_ok=True)  # an old or interrupted pack: the manifest goes first

    checksum = ThreadPoolExecutor(1).submit(source.checksum)  # hashlib frees the GIL: overlaps decoding
    pool = mp.get_context("fork").Pool(workers, _init_worker, (source,)) if workers > 1 else None
    _init_worker(source)
    writers, splits, rows, problems = [], {}, [], []
    try:
        with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                      "{task.fields[rate]}", TimeRemainingColumn(), console=console) as bar:
            for split in SPLITS:
                items = layout.items[split]
                if classes is not None and split == "test":
                    continue  # test has no labels to subset by: kept whole only without --classes
                t0 = time.perf_counter()
                order = np.random.default_rng([seed, SPLITS.index(split)]).permutation(len(items))
                items = [items[i] for i in order]
                writer = ShardWriter(out, split, options["payload"], int(shard_mb * (1 << 20)))
                writers.append(writer)
                task = bar.add_task(split, total=len(items), rate="")
                chunks = [items[i:i + 256] for i in range(0, len(items), 256)]
                tasks = [([it.member for it in c], options["payload"]) for c in chunks]
                results = pool.imap(_work, tasks) if pool else map(_work, tasks)
                converted, skipped = [], [{"file": f, "reason": r} for f, r in layout.problems.get(split, [])]
                for chunk, res in zip(chunks, results):
                    for it, (data, conv, err) in zip(chunk, res):
                        if err:
                            skipped.append({"file": it.member, "reason": err})
                            continue
                        writer.add(it.key, it.label, data)
                        if conv:
                            converted.append(it.member)
                    done = bar.tasks[task].completed + len(chunk)
                    bar.update(task, completed=done, rate=f"{done / (time.perf_counter() - t0):,.0f} img/s")
                shards = writer.finish()
                secs = time.perf_counter() - t0
                n = len(items) - (len(skipped) - len(layout.problems.get(split, [])))
                splits[split] = {"count": n, "found": layout.found(split), "converted": converted,
                                 "skipped": skipped, "shuffle_seed": [seed, SPLITS.index(split)],
                                 "payload_bytes": sum(s["payload_bytes"] for s in shards), "shards": shards}
                problems += [f"  {s['file']}: {s['reason']}" for s in skipped]
                rows.append((split, n, splits[split]["payload_bytes"], len(shards), len(converted), len(skipped), secs))
        if problems and not skip_bad:
            raise PackError(f"{len(problems)} bad file(s) in {source.path} (nothing packed; --skip-bad packs "
                            "the rest):\n" + "\n".join(problems))
        for w in writers:
            w.commit()
        info = source_info or {"kind": source.kind, "path": str(source.path.resolve()), **checksum.result()}
        manifest = {
            "format": FORMAT_NAME, "version": FORMAT_VERSION, "fasttin": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source": info, "payload": options["payload"], "image_shape": list(IMAGE_SHAPE),
            "classes": [{"wnid": w, "words": layout.words.get(w, "")} for w in layout.wnids],
            "options": options, "splits": splits,
        }
        write_json_atomic(out / MANIFEST, manifest)
    except BaseException:
        for w in writers:
            w.abort()
        raise
    finally:
        if pool:
            pool.terminate()
    secs = time.perf_counter() - t_all
    table = Table(title=f"packed {out} in {secs:.1f} s")
    for col in ("split", "images", "MB", "shards", "converted", "skipped", "seconds", "img/s"):
        table.add_column(col, justify="left" if col == "split" else "right")
    for split, n, nbytes, ns, nc, nsk, s in rows:
        table.add_row(split, f"{n:,}", f"{nbytes / 1e6:.1f}", str(ns), str(nc), str(nsk), f"{s:.1f}", f"{n / s:,.0f}")
    console.print(table)
    return manifest


def verify(out: str | Path) -> list[str]:
    """Re-hash every shard against the manifest and decode every sample; the list of problems."""
    out = Path(out)
    manifest = read_manifest(out)
    problems = []
    for split, entry in manifest["splits"].items():
        for shard in entry["shards"]:
            path = out / shard["file"]
            if not path.is_file():
                problems.append(f"{path}: missing")
            elif path.stat().st_size != shard["bytes"]:
                problems.append(f"{path}: {path.stat().st_size} bytes, manifest says {shard['bytes']}")
            elif digest(path) != shard["sha256"]:
                problems.append(f"{path}: sha256 disagrees with the manifest")
        if problems:
            continue
        ds = open_split(out, split)
        for i in range(len(ds)):
            data = ds.encoded(i)
            if ds.payload == "jpeg":
                err = check_image(data.tobytes(), "jpeg")[2]
            else:
                err = None if data.size == np.prod(IMAGE_SHAPE) else f"raw payload of {data.size} bytes"
            if err:
                problems.append(f"{split} sample {i} ({ds.keys[i]}): {err}")
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fasttin.pack", description=__doc__.split("\n\n")[0])
    p.add_argument("--src", default=os.environ.get("TIN_ZIP"),
                   help="tiny-imagenet-200.zip or its extracted folder (default: $TIN_ZIP, else download "
                        "the official archive into ~/.cache/fasttin and check its md5)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--format", dest="payload", choices=["jpeg", "raw"], default="jpeg",
                   help="jpeg: original bytes untouched (default); raw: decoded RGB uint8 64x64x3")
    p.add_argument("--classes", type=int, help="keep the first N wnids in sorted order (drops test)")
    p.add_argument("--per-class", type=int, help="keep the first N training images of each class by file name")
    p.add_argument("--shard-mb", type=float, default=64, help="target shard size in MB (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the once-per-pack shuffle (default 0)")
    p.add_argument("--workers", type=int, default=None, help="decode-check processes (default: all cores)")
    p.add_argument("--skip-bad", action="store_true", help="pack the rest and list bad files in the manifest")
    p.add_argument("--force", action="store_true", help="repack even if --out is already complete")
    p.add_argument("--synthetic", type=int, metavar="N",
                   help="a synthetic set shaped like Tiny-ImageNet, N train images per class (tests, demos)")
    p.add_argument("--verify", type=Path, metavar="DIR", help="re-hash and decode a packed data set, then exit")
    args = p.parse_args(argv)
    try:
        if args.verify:
            problems = verify(args.verify)
            if problems:
                print(f"fasttin.pack: {args.verify} FAILED verification:\n" + "\n".join(problems), file=sys.stderr)
                return 1
            print(f"{args.verify}: every shard matches the manifest and every sample decodes")
            return 0
        for name in ("classes", "per_class", "workers"):
            if getattr(args, name) is not None and getattr(args, name) < 1:
                p.error(f"--{name.replace('_', '-')} must be at least 1")
        pack(args.src, args.out, payload=args.payload, classes=args.classes, per_class=args.per_class,
             shard_mb=args.shard_mb, seed=args.seed, workers=args.workers, skip_bad=args.skip_bad,
             force=args.force, synthetic=args.synthetic)
    except (PackError, SourceError, FormatError, FileNotFoundError, ValueError) as e:
        print(f"fasttin.pack: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fasttin.pack: interrupted; nothing complete-looking was left behind", file=sys.stderr)
        return 130
    if args.synthetic is None:
        print(f"next: python -m fasttin.train --data {args.out} --res 224")
    return 0


if __name__ == "__main__":
    sys.exit(main())
