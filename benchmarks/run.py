"""python -m benchmarks.run: images per second at every stage of the pipeline, side by side with
the classic ImageFolder pipeline, in one run on one machine.

Stages (benchmarks/stages.py): read, decode, resize, copy (host -> device), model (the compute
ceiling of fasttin.loop's step), loader (each backend, and the classic pipeline: ImageFolder over
files upscaled on disk), train (loader + the trainer's step, with its share of the ceiling), and
the optional peers. Each figure is the median of timed repeats after a warm-up, the device
synchronised; a stage whose needs are missing is a record with `skipped` and the reason.
Loader-only figures are measured alternately, repeat by repeat, so they share the machine's state.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from fasttin.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_OK, UserError
from fasttin.fileio import ensure_writable
from fasttin.recipes import RECIPES, resolve

# torch, the stages and the writers are imported only once the flags and the outputs are checked:
# a mistyped --json fails in well under a second instead of after torch's import.
STAGE_NAMES = ("read", "decode", "resize", "copy", "model", "loader", "classic", "train", "peers")
BACKEND_NAMES = ("resident", "pil", "dali", "classic")  # the loader and train stages' loaders


def positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return v


def resolutions(text: str) -> list[int]:
    try:
        res = [int(r) for r in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if any(r < 16 for r in res):
        raise argparse.ArgumentTypeError(f"{text}: every resolution must be at least 16")
    return res


def names_from(choices: tuple[str, ...], what: str):
    """An argparse type: a comma-separated subset of `choices`."""
    def parse(text: str) -> set[str]:
        chosen = set(text.split(","))
        unknown = chosen - set(choices)
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(sorted(unknown))}: choose from "
                                             f"{', '.join(choices)}")
        return chosen
    return parse


def stage_list(text: str) -> set[str]:
    chosen = names_from(STAGE_NAMES, "stages")(text)
    return chosen | ({"classic"} if "loader" in chosen else set())  # loader includes the classic pipeline


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="packed data set (default: a synthetic one made in a temporary folder)")
    p.add_argument("--split", default="val", help="split to read (default val)")
    p.add_argument("--res", type=resolutions, help="comma-separated resolutions (default 64,224; 64 with --quick)")
    p.add_argument("--recipe", choices=list(RECIPES), default="seed-64-scratch",
                   help="the trainer's settings the model and train stages step with (default seed-64-scratch)")
    p.add_argument("--batch-size", type=positive, default=256)
    p.add_argument("--classic-batch-size", type=positive, default=100, help="the classic pipeline's batch "
                   "(write-up: 100)")
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when available")
    p.add_argument("--augment", help="augmentation of the loader stages (default: the recipe's)")
    p.add_argument("--workers", type=positive, help="loader threads/processes (default: all cores)")
    p.add_argument("--repeats", type=positive, default=5, help="timed repeats per figure (median reported)")
    p.add_argument("--batches", type=int, default=0, help="batches per loader repeat (default 0: a whole epoch)")
    p.add_argument("--steps", type=positive, default=5, help="training steps per model and train repeat")
    p.add_argument("--decode-images", type=positive, default=4096, help="images per decode/resize repeat")
    p.add_argument("--compile-all", action="store_true", help="compile every model configuration, not only "
                   "bf16 channels_last")
    p.add_argument("--compile-cpu", action="store_true", help="also measure torch.compile on the CPU (slow)")
    p.add_argument("--summarize", type=Path, metavar="JSON", help="print the short summary of a finished run and exit")
    p.add_argument("--cache", default="bench-out/cache", help="where the classic pipeline's upscaled files go")
    p.add_argument("--stages", type=stage_list, default="read,decode,resize,copy,model,loader,train",
                   help=f"which stages to run, of {','.join(STAGE_NAMES)} (loader includes classic; "
                   "peers is optional)")
    p.add_argument("--backends", type=names_from(BACKEND_NAMES, "backends"), default=",".join(BACKEND_NAMES),
                   help=f"the loaders of the loader and train stages, of {','.join(BACKEND_NAMES)} (default all)")
    p.add_argument("--quick", action="store_true", help="a tiny synthetic set and few repeats (CI smoke)")
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    p.add_argument("--plot", type=Path)
    return p


def check_outputs(args) -> None:
    """Every output writable before any work (a mistyped --json costs a second, not the run)."""
    for path in (args.json, args.markdown, args.plot):
        if path:
            ensure_writable(path)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UserError(f"--plot {args.plot}: matplotlib is not installed") from None
    if args.data is not None:
        ensure_writable(Path(args.cache), folder=True)


def summarize(path: Path) -> int:
    from rich.console import Console

    from benchmarks import writers
    try:
        records = json.loads(path.read_text())["records"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"--summarize {path}: not a benchmarks.run JSON ({type(e).__name__}: {e})") from None
    writers.print_summary(records, Console())
    return EXIT_OK


def settle(args) -> None:
    """Flags that depend on others: --quick's small sizes, the recipe's precision and augmentation."""
    import torch
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device here; use --device cpu")
    from fasttin.loaders import AUGMENTS
    cfg = resolve(args.recipe)
    args.amp, args.augment = cfg["amp"], args.augment or cfg["augment"]
    if args.augment not in AUGMENTS:
        raise UserError(f"--augment {args.augment}: choose one of {', '.join(AUGMENTS)}")
    args.res = args.res or ([64] if args.quick else [64, 224])
    if args.quick:
        args.repeats, args.batches, args.steps, args.decode_images = 2, 0, 1, 256
        args.batch_size = min(args.batch_size, 8)
        args.classic_batch_size = min(args.classic_batch_size, 8)


def open_data(args):
    from fasttin.shards import FormatError, open_split
    try:
        return open_split(args.data, args.split)
    except (FileNotFoundError, FormatError) as e:
        raise UserError(f"--data {args.data}: {e}") from None
    except ValueError as e:  # an unknown split
        raise UserError(f"--split {args.split}: {e}") from None


def measure(args, out: dict) -> None:
    """Every selected stage of the table, into out["records"] as they come (so that an interrupted
    run still has what it measured) with the machine's description in out["environment"]."""
    import torch

    from benchmarks import stages
    from benchmarks.runner import Bench, run_table
    from fasttin.info import dated_environment
    with tempfile.TemporaryDirectory(prefix="fasttin-bench-") as tmp:
        if args.data is None:
            from fasttin.pack import pack
            args.data, args.cache = tmp, str(Path(tmp) / "cache")
            pack(None, args.data, synthetic=8 if args.quick else 50, classes=20 if args.quick else 200, quiet=True)
        ds = open_data(args)
        torch.manual_seed(0)
        b = Bench(args, torch.device(args.device), ds)
        b.records = out["records"]
        env = out["environment"] = dated_environment()
        print(f"benchmarks on {b.device} ({env['gpu'] or env['cpu']}), {len(ds):,} {args.split} images from "
              f"{args.data}", file=sys.stderr)
        run_table(b, stages.table(args.backends), args.stages, args.res)
    stages.add_ratios(out["records"])


def keep_partial(args, out: dict, why: str) -> str:
    """The records of a run that stopped early, into --json marked incomplete; says where."""
    from benchmarks import writers
    if not (args.json and out["records"]):
        return ""
    out["incomplete"] = f"{why} after {len(out['records'])} records"
    try:
        writers.write_json(args.json, finish(out))
    except UserError:
        return ""
    return f"; the {len(out['records'])} records measured so far are in {args.json}, marked incomplete"


def finish(out: dict) -> dict:
    for r in out["records"]:
        r["environment"] = out["environment"]
    return out


def report(args, out: dict) -> int:
    """The files first (JSON, Markdown, plot: one failing costs only itself), then the tables."""
    from rich.console import Console

    from benchmarks import writers
    failed = writers.write_outputs({"json": args.json, "markdown": args.markdown, "plot": args.plot}, finish(out))
    console = Console()
    console.print(writers.table(out["records"]))
    writers.print_summary(out["records"], console)
    for line in failed:
        print(f"benchmarks.run: error: {line}", file=sys.stderr)
    return EXIT_BAD_INPUT if failed else EXIT_OK


def bench(args, argv) -> int:
    check_outputs(args)
    settle(args)
    command = "python -m benchmarks.run " + " ".join(map(str, argv if argv is not None else sys.argv[1:]))
    out = {"environment": None, "command": command, "records": []}
    try:
        measure(args, out)
    except KeyboardInterrupt:
        print(f"benchmarks.run: interrupted{keep_partial(args, out, 'interrupted')}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BaseException:  # a bug in a stage: keep what was measured, and the traceback
        keep_partial(args, out, "a stage failed")
        raise
    return report(args, out)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        return summarize(args.summarize) if args.summarize else bench(args, argv)
    except UserError as e:
        print(f"benchmarks.run: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
