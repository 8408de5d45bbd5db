"""python -m fasttin.pack: Tiny-ImageNet (zip, folder, download or synthetic) -> dense binary shards.

Every image is decoded once to prove it is readable and 64x64; JPEGs a GPU decoder reads are
stored untouched, anything else (PNG under a .JPEG name, CMYK, 16-bit, palette, alpha) is
converted to 8-bit RGB (see `rgb8`) and re-encoded as JPEG q95 4:4:4. A pack is built in a
sibling temporary folder and swapped in only when complete, so an interrupted or failed pack
(or --force repack) never destroys the earlier one nor looks complete itself.
"""
from __future__ import annotations

import io
import multiprocessing as mp
import os
import re
import reprlib
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image

from fasttin import __version__
from fasttin.errors import (
    EXIT_FAILED_CHECK,
    EXIT_OK,
    CommandParser,
    UserError,
    interrupt_on_sigterm,
    run_command,
    shown,
)
from fasttin.fileio import clean_stale_folders, clean_stale_tmp, ensure_writable, replace_folder, write_json_atomic
from fasttin.forking import fork_pool, pool_worker_signals
from fasttin.machine import usable_cores
from fasttin.recipes import DEFAULT_DATA, count
from fasttin.shards import (
    FORMAT_NAME,
    FORMAT_VERSION,
    IMAGE_SHAPE,
    MANIFEST,
    PAYLOAD_KINDS,
    FormatError,
    ShardWriter,
    open_split,
    read_manifest,
)
from fasttin.source import SPLITS, MemberError, Source, download_official
from fasttin.synthetic import make_layout


class PackError(UserError):
    """Packing refused: the message names every culprit."""


# ---- one image -> 8-bit RGB -----------------------------------------------------------------------

def rgb8(im: Image.Image) -> tuple[np.ndarray | None, str | None]:
    """(uint8 [H, W, 3], None), or (None, why) for a pixel mode with no faithful 8-bit RGB.

    16-bit and 32-bit integer grey (I;16*, I) is scaled by 1/257 (0..65535 -> 0..255), never
    clipped; images with transparency (RGBA, LA, PA, palette with a transparent entry) are
    composited on black; 1-bit, grey, CMYK and YCbCr go through PIL's conversion; float (F) and
    other modes are refused, since their range is not defined.
    """
    mode = im.mode
    if mode in ("RGB", "L", "1", "CMYK", "YCbCr", "RGBX"):
        return np.asarray(im.convert("RGB")), None
    if mode in ("P", "PA", "RGBA", "RGBa", "LA", "La"):
        rgba = np.asarray(im.convert("RGBA"), dtype=np.uint32)  # palette transparency becomes alpha
        return ((rgba[..., :3] * rgba[..., 3:] + 127) // 255).astype(np.uint8), None
    if mode == "I" or mode.startswith("I;16"):
        v = np.asarray(im).astype(np.int64)
        if v.min() < 0 or v.max() > 65535:
            return None, f"has 32-bit pixel values ({v.min()}..{v.max()}) outside the 16-bit range"
        grey = ((v + 128) // 257).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1), None
    return None, f"has pixel mode {mode}, which has no defined 8-bit RGB conversion"


def check_image(data: bytes, payload: str) -> tuple[bytes | None, bool, str | None]:
    """(bytes to store, converted?, error). Decodes once: the proof the image is usable."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's per-image warnings would break the one-line report
        try:
            with Image.open(io.BytesIO(data)) as im:
                fmt, mode, size = im.format, im.mode, im.size
                if size != IMAGE_SHAPE[:2]:
                    return None, False, f"is {size[0]}x{size[1]}, not 64x64"
                im.load()
                rgb, why = rgb8(im)
        except Exception as e:  # the per-file boundary: PIL raises many kinds for corrupt data
            return None, False, f"does not decode ({type(e).__name__}: {e})"
    if why:
        return None, False, why
    gpu_readable = fmt == "JPEG" and mode in ("RGB", "L")
    if payload == "raw":
        return rgb.tobytes(), not gpu_readable, None
    if gpu_readable:
        return data, False, None
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, "JPEG", quality=95, subsampling=0)
    return out.getvalue(), True, None


_SRC: Source | None = None


def _init_worker(src: Source):
    global _SRC
    _SRC = src
    if mp.current_process().name != "MainProcess":  # stopping is the main process's job
        pool_worker_signals()


def _check_one(member: str, payload: str):
    try:
        data = _SRC.read(member)
    except MemberError as e:  # bad CRC, broken deflate stream, unreadable or huge file: this file only
        return None, False, str(e).removeprefix(f"{shown(member)}: ")  # the name may hold ": " itself
    return check_image(data, payload)


def _work(task):
    members, payload = task
    return [_check_one(m, payload) for m in members]


# ---- where a pack is built, and how it replaces the old one ------------------------------------------

def is_complete(out: Path) -> bool:
    try:
        read_manifest(out)
        return True
    except FormatError:
        return False


# What the packer itself writes into a pack's folder, and nothing else: the manifest and the shards
# (`<split>-NNN.shard`), and their temporaries (`manifest.json.tmp<pid>.json`, `<split>-NNN.shard.tmp<pid>`,
# see fileio.tmp_name). A user's `notes.tmp123.txt` is not one of them.
_PACK_FILE = re.compile(r"(?:manifest\.json|(?:train|val|test)-\d{3,}\.shard)")
_PACK_TMP = re.compile(r"(?:manifest\.json\.tmp(\d+)(?:\.json)?|(?:train|val|test)-\d{3,}\.shard\.tmp(\d+))")


def _packers_own(folder: Path) -> bool:
    """Whether everything in `folder` is what a pack build writes (an empty folder too): only such a
    folder beside --out may be removed as a killed pack's leftover; anything else is a user's."""
    try:
        return all((_PACK_FILE.fullmatch(p.name) or _PACK_TMP.fullmatch(p.name)) and p.is_file()
                   and not p.is_symlink() for p in folder.iterdir())
    except OSError:
        return False


def clean_leftovers(out: Path) -> list[Path]:
    """Remove what killed packs into `out` left, and only that: their build folders beside it
    (`<out>.tmp<pid>`, `<out>.old.tmp<pid>`, holding nothing but pack files; a swap cut short is
    repaired first) and the packer's own temporaries inside it, in both cases of a process that no
    longer runs. A user's file or folder that merely looks like a temporary is never touched.
    Returns what was removed."""
    return clean_stale_folders(out, is_complete, _packers_own) + clean_stale_tmp(out, _PACK_FILE.fullmatch)


# a value read from a manifest, bounded for a one-line message (a hand-made one may hold anything)
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxdict, _SHORT.maxlist, _SHORT.maxstring, _SHORT.maxlong = 2, 12, 6, 60, 40


def _check_replaceable(out: Path) -> None:
    """`out` may only be replaced if it is missing, empty, or holds nothing but a pack (complete
    or the leftovers of an interrupted one): never a folder of other files."""
    if out.exists() and not out.is_dir():
        raise PackError(f"--out {out} is a file, not a folder")
    if out.is_dir():
        other = sorted(p.name for p in out.iterdir()
                       if not (_PACK_FILE.fullmatch(p.name) or _PACK_TMP.fullmatch(p.name)) or not p.is_file())
        if other:
            raise PackError(f"--out {out} holds files that are not a packed data set ({shown(other[0])}"
                            f"{' ...' if len(other) > 1 else ''}): choose a new or empty folder")


def _check_same_source(src, recorded, out: Path) -> None:
    """A complete pack is reused only for the source it was packed from (path and size, as its
    manifest records them): another --src, or one that is gone, is said, not silently ignored."""
    if src is None or not isinstance(recorded, dict):
        return
    src = Path(src)
    if not src.exists():
        raise PackError(f"--src {src}: no such file or folder ({out} holds a pack of {recorded.get('path')})")
    size = src.stat().st_size if src.is_file() else None
    if str(src.resolve()) != recorded.get("path") or (size is not None and recorded.get("bytes") not in (None, size)):
        raise PackError(f"{out} already holds a data set packed from {shown(str(recorded.get('path')))}, not from "
                        f"--src {src}; use --force to replace it")


@dataclass(frozen=True)
class PackOptions:
    """How a pack is made: the one value the command, `pack()` and the manifest's "options" share
    (a pack made with other options is never reused for these)."""
    payload: str = "jpeg"  # jpeg: the original bytes; raw: decoded RGB uint8 64x64x3
    classes: int | None = None  # the first N wnids in sorted order (drops test)
    per_class: int | None = None  # the first N training images of each class by file name
    shard_mb: float = 64  # target shard size
    seed: int = 0  # the once-per-pack shuffle
    skip_bad: bool = False  # pack the rest and list bad files in the manifest
    synthetic: int | None = None  # a synthetic set shaped like Tiny-ImageNet, N train images per class

    def __post_init__(self):
        if self.payload not in PAYLOAD_KINDS:
            raise PackError(f"--format {self.payload!r}: choose jpeg or raw")
        for flag, v in (("--classes", self.classes), ("--per-class", self.per_class), ("--synthetic", self.synthetic)):
            if v is not None and (not isinstance(v, int) or v < 1):
                raise PackError(f"{flag} {v}: must be at least 1")
        if not 1 <= self.shard_mb * (1 << 20) < 1 << 32:  # the writer's size is a whole number of bytes
            raise PackError(f"--shard-mb {self.shard_mb}: must be at least 1 byte (1e-6) and below 4096 (u32 offsets)")
        if self.seed < 0:
            raise PackError(f"--seed {self.seed}: must be 0 or more")


def pack(src: str | Path | None, out: str | Path, *, workers: int | None = None, force: bool = False,
         quiet: bool = False, **options) -> dict:
    """Pack a source into `out` with PackOptions(**options); returns the manifest. Raises a UserError
    (PackError, SourceError, OutputError...) on bad input or an unwritable output, leaving any
    earlier pack in `out` intact."""
    out = Path(out)
    out = out.resolve() if out.is_symlink() or out.name in ("", "..") else out  # the swap renames `out`
    opts = PackOptions(**options)
    if workers is not None and workers < 1:
        raise PackError(f"--workers {workers}: must be at least 1")
    if force or not is_complete(out):  # a refusal must come before anything is touched
        _check_replaceable(out)
    clean_leftovers(out)
    if is_complete(out) and not force:
        old = read_manifest(out)
        if old.get("options") != asdict(opts):
            raise PackError(f"{out} already holds a data set packed with other options "
                            f"({_SHORT.repr(old.get('options'))}); use --force to replace it")
        _check_same_source(src, old.get("source"), out)
        if not quiet:
            print(f"{out} is already packed (manifest.json present); nothing to do (--force repacks)")
        return old
    _check_replaceable(out)
    if os.path.ismount(out):  # checked before the work: the swap's renames cannot move a mount point
        raise PackError(f"--out {out} is a mount point: the pack is built beside it and renamed into place, which "
                        "a mount point cannot take; give a folder inside it")
    ensure_writable(out.parent, folder=True)
    if opts.synthetic is not None:
        with tempfile.TemporaryDirectory(prefix="fasttin-synth-") as tmp:
            root = make_layout(tmp, opts.classes or 200, opts.synthetic, seed=opts.seed)
            # the synthetic layout has exactly `classes` classes: not a subset, so test stays
            return _pack(Source(root), out, opts, workers, quiet, subset=False,
                         source_info={"kind": "synthetic", "per_class": opts.synthetic,
                                      "classes": opts.classes or 200})
    if src is None:
        src = download_official()
    source = Source(src)
    if source.kind == "folder" and out.resolve().is_relative_to(source.root.resolve()):
        raise PackError(f"--out {out} is inside --src {source.root}: refusing to write into the source")
    return _pack(source, out, opts, workers, quiet)


def _pack_split(split, items, layout, opts: PackOptions, work, pool, bar) -> dict:
    """Check and write one split into `work`; its manifest entry."""
    t0 = time.perf_counter()
    order = np.random.default_rng([opts.seed, SPLITS.index(split)]).permutation(len(items))
    items = [items[i] for i in order]
    writer = ShardWriter(work, split, opts.payload, int(opts.shard_mb * (1 << 20)))
    task = bar.add_task(split, total=len(items), rate="")
    chunks = [items[i:i + 256] for i in range(0, len(items), 256)]
    tasks = [([it.member for it in c], opts.payload) for c in chunks]
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
    shards = writer.commit()
    n = len(items) - (len(skipped) - len(layout.problems.get(split, [])))
    return {"count": n, "found": layout.found(split), "converted": converted, "skipped": skipped,
            "shuffle_seed": [opts.seed, SPLITS.index(split)],
            "payload_bytes": sum(s["payload_bytes"] for s in shards), "shards": shards,
            "seconds": time.perf_counter() - t0}


def _bad_files(problems: list[dict], source: Source) -> PackError:
    lines = [f"{shown(p['file'])}: {p['reason']}" for p in problems]
    if len(lines) == 1:
        return PackError(f"{lines[0]} (in {source.path}; nothing packed; --skip-bad packs the rest)")
    return PackError(f"{len(lines)} bad files in {source.path} (nothing packed; --skip-bad packs the rest):\n"
                     + "\n".join("  " + line for line in lines))


def _pack(source, out: Path, opts: PackOptions, workers, quiet, subset: bool = True, source_info=None) -> dict:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    console = Console(stderr=True, quiet=quiet)
    t_all = time.perf_counter()
    classes = opts.classes if subset else None
    layout = source.layout(classes, opts.per_class)
    workers = workers or usable_cores()
    checksum = ThreadPoolExecutor(1).submit(source.checksum)  # hashlib frees the GIL: overlaps decoding
    splits = {}

    def build(work: Path) -> dict:
        pool = fork_pool(workers, _init_worker, (source,)) if workers > 1 else None
        _init_worker(source)
        try:
            with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                          "{task.fields[rate]}", TimeRemainingColumn(), console=console,
                          disable=not console.is_terminal) as bar:  # a log or pipe gets the summary table
                for split in SPLITS:
                    if classes is None or split != "test":  # test has no labels to subset by
                        splits[split] = _pack_split(split, layout.items[split], layout, opts, work, pool, bar)
        finally:
            if pool:
                pool.terminate()
        source_skipped = [{"file": f, "reason": r} for f, r in layout.problems.get("source", [])]
        problems = source_skipped + [s for e in splits.values() for s in e["skipped"]]
        if problems and not opts.skip_bad:
            raise _bad_files(problems, source)
        info = source_info or {"kind": source.kind, "path": str(source.path.resolve()), **checksum.result()}
        manifest = {
            "format": FORMAT_NAME, "version": FORMAT_VERSION, "fasttin": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source": info, "payload": opts.payload, "image_shape": list(IMAGE_SHAPE),
            "classes": [{"wnid": w, "words": layout.words.get(w, "")} for w in layout.wnids],
            "options": asdict(opts), "source_skipped": source_skipped,
            "splits": {k: {f: v for f, v in e.items() if f != "seconds"} for k, e in splits.items()},
        }
        write_json_atomic(work / MANIFEST, manifest)  # last: its presence means complete
        return manifest

    manifest = replace_folder(out, build)
    _report(console, out, splits, time.perf_counter() - t_all)
    return manifest


def _report(console, out, splits, secs) -> None:
    from rich.table import Table

    table = Table(title=f"packed {out} in {secs:.1f} s")
    for col in ("split", "images", "MB", "shards", "converted", "skipped", "seconds", "img/s"):
        table.add_column(col, justify="left" if col == "split" else "right")
    for split, e in splits.items():
        n, s = e["count"], e["seconds"]
        table.add_row(split, f"{n:,}", f"{e['payload_bytes'] / 1e6:.1f}", str(len(e["shards"])),
                      str(len(e["converted"])), str(len(e["skipped"])), f"{s:.1f}", f"{n / s:,.0f}")
    console.print(table)


def verify(out: str | Path) -> list[str]:
    """Re-hash every shard against the manifest, check every index, decode every sample; the
    problems, one line each. A manifest that cannot be read raises FormatError."""
    out = Path(out)
    manifest = read_manifest(out)
    problems = []
    for split in manifest["splits"]:
        try:
            ds = open_split(out, split, verify=True)
        except FormatError as e:
            problems.append(str(e))
            continue
        if ds.payload != "jpeg":
            continue  # raw payload sizes are checked at open
        for i in range(len(ds)):
            err = check_image(ds.encoded(i).tobytes(), "jpeg")[2]
            if err:
                problems.append(f"{out}/{ds.describe(i)}: {err}")
    return problems


def main(argv=None) -> int:
    p = CommandParser("fasttin.pack", description=__doc__.split("\n\n")[0])
    p.add_argument("--src", default=os.environ.get("TIN_ZIP"),
                   help="tiny-imagenet-200.zip or its extracted folder (default: $TIN_ZIP, else download "
                        "the official archive into ~/.cache/fasttin and check its md5)")
    p.add_argument("--out", type=Path, default=DEFAULT_DATA, help=f"output folder (default {DEFAULT_DATA})")
    p.add_argument("--format", dest="payload", choices=["jpeg", "raw"], default="jpeg",
                   help="jpeg: original bytes untouched (default); raw: decoded RGB uint8 64x64x3")
    p.add_argument("--classes", type=count("classes"), help="keep the first N wnids in sorted order (drops test)")
    p.add_argument("--per-class", type=count("per_class"),
                   help="keep the first N training images of each class by file name")
    p.add_argument("--shard-mb", type=float, default=64, help="target shard size in MB (default 64)")
    p.add_argument("--seed", type=count("seed", positive=False), default=0,
                   help="seed of the once-per-pack shuffle (default 0)")
    p.add_argument("--workers", type=count("workers"), help="decode-check processes (default: all cores)")
    p.add_argument("--skip-bad", action="store_true", help="pack the rest and list bad files in the manifest")
    p.add_argument("--force", action="store_true",
                   help="repack even if --out is already complete (built beside it, swapped in when done)")
    p.add_argument("--synthetic", type=count("synthetic"), metavar="N",
                   help="a synthetic set shaped like Tiny-ImageNet, N train images per class (tests, demos)")
    p.add_argument("--verify", type=Path, metavar="DIR",
                   help="check, re-hash and decode a packed data set (exit 1 if damaged)")
    args = p.parse_args(argv)
    interrupt_on_sigterm()

    def body() -> int:
        if args.verify:
            return _verify_main(args.verify)
        pack(args.src, args.out, payload=args.payload, classes=args.classes, per_class=args.per_class,
             shard_mb=args.shard_mb, seed=args.seed, workers=args.workers, skip_bad=args.skip_bad,
             force=args.force, synthetic=args.synthetic)
        if args.synthetic is None:
            print(f"next: python -m fasttin.train --data {args.out} --res 224")
        return EXIT_OK
    return run_command("fasttin.pack", body,
                       interrupted="any earlier pack is intact and nothing complete-looking was left behind")


def _verify_main(folder: Path) -> int:
    if folder.exists() and not folder.is_dir():  # e.g. DIR/manifest.json given for DIR
        raise PackError(f"--verify {folder} is a file: --verify takes the pack's folder ({folder.parent})")
    problems = verify(folder)
    if len(problems) == 1:
        print(f"fasttin.pack: {folder} FAILED verification: {problems[0]}", file=sys.stderr)
    elif problems:
        print(f"fasttin.pack: {folder} FAILED verification ({len(problems)} problems):\n"
              + "\n".join(problems), file=sys.stderr)
    else:
        print(f"{folder}: every shard matches the manifest and every sample decodes")
    return EXIT_FAILED_CHECK if problems else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
