"""python -m benchmarks.run: images per second at every stage of the pipeline, side by side with
the classic ImageFolder pipeline, in one run on one machine.

The stages are benchmarks/stages.py's table; each figure is the median of timed rounds after a
warm-up (benchmarks/runner.py), and a stage whose needs are missing is a record with the reason.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from benchmarks import LOADERS
from fasttin.errors import EXIT_BAD_INPUT, EXIT_OK, CommandParser, UserError, interrupt_on_sigterm, run_command
from fasttin.fileio import ensure_writable, refuse_output_over_inputs, write_json_atomic
from fasttin.recipes import AUGMENTS, RECIPES, STEMS, Setting, count, flag_type, res_problem, resolve

# torch, the stages and the writers are imported only once the flags and the outputs are checked:
# a mistyped --json fails in well under a second instead of after torch's import.
STAGE_NAMES = ("read", "decode", "resize", "copy", "model", "loader", "classic", "train", "peers", "accounting",
               "agreement")
OUTPUTS = ("json", "markdown", "plot")  # written in this order (benchmarks/writers.py)
positive = count("value")


def positives(text: str) -> list[int]:
    return list(dict.fromkeys(positive(t) for t in text.split(",")))  # a repeat would be measured twice


def resolutions(text: str) -> list[int]:
    res = positives(text)
    why = next(filter(None, map(res_problem, res)), None)
    if why:
        raise argparse.ArgumentTypeError(f"{text}: {why}")
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


def parser() -> CommandParser:
    p = CommandParser("benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="packed data set (default: a synthetic one made in a temporary folder)")
    p.add_argument("--split", default="val", help="split to read (default val)")
    p.add_argument("--res", type=resolutions, help="comma-separated resolutions (default 64,224; 64 with --quick)")
    p.add_argument("--recipe", choices=list(RECIPES), default="seed-64-scratch",
                   help="the trainer's settings the model and train stages step with (default seed-64-scratch)")
    p.add_argument("--batch-size", type=positive, default=256)
    p.add_argument("--batch-sizes", type=positives, help="comma-separated batch sizes of the model stage's grid "
                   "(default: --batch-size)")
    p.add_argument("--threads", type=positives, help="comma-separated torch thread counts of the model stage's "
                   "grid (default: all cores)")
    p.add_argument("--classic-batch-size", type=positive, default=100, help="the classic pipeline's batch "
                   "(write-up: 100)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when there is one)")
    p.add_argument("--augment", choices=AUGMENTS, help="augmentation of the loader stages (default: the recipe's)")
    p.add_argument("--workers", type=positive, help="loader threads/processes (default: all cores)")
    p.add_argument("--repeats", type=positive, default=5, help="timed repeats per figure (median reported)")
    p.add_argument("--batches", type=count("batches", positive=False), default=0,
                   help="batches per loader repeat (default 0: a whole epoch)")
    p.add_argument("--steps", type=positive, default=5, help="training steps per model and train repeat")
    p.add_argument("--decode-images", type=positive, default=4096, help="images per decode/resize repeat")
    p.add_argument("--compiled", choices=("none", "some", "all", "only"), default="some",
                   help="torch.compile'd points of the model stage: none; some (default: the machine's own precision "
                   "and layout, bf16 NHWC where it has bf16, for each stem, beside every eager point); all (every "
                   "point compiled too); only (just those compiled points: a separate run, since compiling takes "
                   "the longest)")
    p.add_argument("--stems", type=names_from(STEMS, "stems"), default=",".join(STEMS),
                   help="the model stage's stems (default both)")
    p.add_argument("--compile-cpu", action="store_true", help="also measure torch.compile on the CPU (slow)")
    p.add_argument("--summarize", type=Path, metavar="JSON", help="print the short summary of a finished run and exit")
    p.add_argument("--cache", default="bench-out/cache", help="where the classic pipeline's upscaled files go")
    p.add_argument("--stages", type=stage_list, default="read,decode,resize,copy,model,loader,train",
                   help=f"which stages to run, of {','.join(STAGE_NAMES)} (loader includes classic; "
                   "peers, accounting and agreement are optional)")
    p.add_argument("--backends", type=names_from(LOADERS, "backends"), default=",".join(LOADERS),
                   help=f"the loaders of the loader and train stages, of {','.join(LOADERS)} (default all)")
    p.add_argument("--peers", default="all", help="the peers stage's loaders, comma-separated (default all; "
                   "see benchmarks/peers/loaders.py)")
    p.add_argument("--mae-images", type=positive, default=500, help="the peers' MAE against PIL bicubic on the "
                   "first N images")
    p.add_argument("--ffcv-site", type=Path, help="the folder benchmarks/peers/setup-ffcv.sh "
                   "installed FFCV into (default .peers-site)")
    p.add_argument("--peer-timeout", type=flag_type(Setting("peer_timeout", None, float, "", positive=True)),
                   default=1800, help="seconds a peer's worker may take to answer")
    p.add_argument("--trainer-epochs", type=positive, default=2, help="the agreement's fasttin.train epochs a "
                   "round (the last one is timed)")
    p.add_argument("--quick", action="store_true", help="a tiny synthetic set and few repeats (CI smoke)")
    for output in OUTPUTS:
        p.add_argument(f"--{output}", type=Path)
    return p


def check_outputs(args) -> None:
    """Every output writable before any work (a mistyped --json costs a second, not the run), and
    no two the same file (the later would overwrite the earlier: the JSON is the evidence)."""
    outputs = {f"--{o}": getattr(args, o) for o in OUTPUTS if getattr(args, o)}
    for flag, path in outputs.items():
        ensure_writable(path)
        same = [f for f, p in outputs.items() if f != flag and Path(p).resolve() == Path(path).resolve()]
        if same:
            raise UserError(f"{same[0]} and {flag} both name {path}: give each output its own file")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UserError(f"--plot {args.plot}: matplotlib is not installed") from None
    if args.data is not None:
        for flag, path in (*outputs.items(), ("--cache", args.cache)):  # the pack's folder holds the pack only
            refuse_output_over_inputs(flag, path, folders=[("the packed data set --data", args.data)])
        ensure_writable(Path(args.cache), folder=True)


def summarize(path: Path) -> int:
    from rich.console import Console

    from benchmarks import writers
    try:  # a record without its fields is refused before anything is printed
        shown = writers.summary(json.loads(path.read_text())["records"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"--summarize {path}: not a benchmarks.run JSON ({type(e).__name__}: {e})") from None
    for part in shown:
        Console().print(part)
    return EXIT_OK


def print_err(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def resolve_flags(args) -> None:
    """Flags that depend on others: --quick's small sizes, the recipe's precision and augmentation."""
    from fasttin.info import resolve_device
    args.device = str(resolve_device(args.device))
    from fasttin import tuning
    cfg = resolve(args.recipe)
    decision = tuning.choose(cfg["amp"], cfg["channels_last"], args.device, log=print_err)
    for line in decision.warnings:
        print_err(line)
    args.chosen, args.chosen_why = decision.values, decision.why  # the trainer's own choice on this machine
    args.amp, args.augment = decision.values["amp"], args.augment or cfg["augment"]
    args.res = args.res or ([64] if args.quick else [64, 224])
    if "peers" in args.stages:
        from benchmarks.peers.loaders import PEERS
        from benchmarks.peers.stage import DEFAULT_SITE
        try:
            args.peers = names_from(tuple(PEERS), "peers")(",".join(PEERS) if args.peers == "all" else args.peers)
        except argparse.ArgumentTypeError as e:
            raise UserError(f"--peers: {e}") from None
        args.ffcv_site = args.ffcv_site or DEFAULT_SITE
    if args.quick:
        args.repeats, args.batches, args.steps, args.decode_images = 2, 0, 1, 256
        args.batch_size = min(args.batch_size, 8)
        args.classic_batch_size = min(args.classic_batch_size, 8)


def measure(args, out: dict) -> None:
    """Every selected stage of the table, into out["records"] as they come (so that an interrupted
    run still has what it measured) with the machine's description in out["environment"]."""
    import torch

    from benchmarks import stages
    from benchmarks.runner import Bench, run_table
    from fasttin.shards import open_split
    with tempfile.TemporaryDirectory(prefix="fasttin-bench-") as tmp:
        if args.data is None:
            from fasttin.pack import pack
            args.data, args.cache = tmp, str(Path(tmp) / "cache")
            pack(None, args.data, synthetic=8 if args.quick else 50, classes=20 if args.quick else 200, quiet=True)
        ds = open_split(args.data, args.split)  # a FormatError names the folder or the split
        torch.manual_seed(0)
        b = Bench(args, torch.device(args.device), ds, out["records"], out["environment"])
        env = out["environment"]
        print(f"benchmarks on {b.device} ({env['gpu'] or env['cpu']}), {len(ds):,} {args.split} images from "
              f"{args.data}", file=sys.stderr)
        run_table(b, stages.table(args.backends), args.stages, args.res)
    stages.add_ratios(out["records"])


def keep_partial(args, out: dict, why: str) -> str:
    """The records of a run that stopped early, into --json marked incomplete; says where."""
    if not (args.json and out["records"]):
        return ""
    out["incomplete"] = f"{why} after {len(out['records'])} records"
    try:
        write_json_atomic(args.json, out)
    except UserError:
        return ""
    return f"the {len(out['records'])} records measured so far are in {args.json}, marked incomplete"


def report(args, out: dict) -> int:
    """The files first (JSON, Markdown, plot: one failing costs only itself), then the tables."""
    from rich.console import Console

    from benchmarks import writers
    failed = writers.write_outputs({o: getattr(args, o) for o in OUTPUTS}, out)
    for part in (writers.table(out["records"]), *writers.summary(out["records"])):
        Console().print(part)
    for line in failed:
        print(f"benchmarks.run: error: {line}", file=sys.stderr)
    return EXIT_BAD_INPUT if failed else EXIT_OK


def bench(args, argv) -> int:
    check_outputs(args)
    resolve_flags(args)
    from benchmarks.runner import envelope
    out = envelope("benchmarks.run", argv, records=[], chosen=args.chosen_why)
    try:
        measure(args, out)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(keep_partial(args, out, "interrupted")) from None
    except BaseException:  # a bug in a stage: keep what was measured, and the traceback
        keep_partial(args, out, "a stage failed")
        raise
    return report(args, out)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    interrupt_on_sigterm()  # `timeout` keeps what was measured, as Ctrl-C does
    return run_command("benchmarks.run",
                       lambda: summarize(args.summarize) if args.summarize else bench(args, argv))


if __name__ == "__main__":
    sys.exit(main())
