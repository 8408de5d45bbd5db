"""python -m benchmarks.peers: fasttin's loaders side by side with FFCV, DALI, torchvision and the
classic pipeline, loader only, in one run on this machine (see benchmarks.peers.runner)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.peers.loaders import PEERS
from benchmarks.peers.runner import DEFAULT_SITE, run_peers
from fasttin.errors import EXIT_BAD_INPUT, EXIT_OK, UserError
from fasttin.fileio import ensure_writable, write_atomic


def markdown(records: list[dict], env: dict, command: str) -> str:
    """The side-by-side table for BENCHMARKS.md."""
    lines = [f"Command: `{command}`  ",
             f"Date: {env['date']}; machine: {env['cpu']} x{env['cores']}; torch {env['torch']}, torchvision "
             f"{env['torchvision']}, DALI {env['dali']}, pillow {env['pillow']} (simd: {env['pillow_simd']}), "
             f"numpy {env['numpy']}, Python {env['python']}", "",
             "| loader | version | res | img/s | vs FFCV raw | out | kernel | MAE vs PIL bicubic (0-255) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        if r.get("skipped"):
            lines.append(f"| {r['name']} | | {r['res']} | skipped: {r['skipped']} | | | {r['kernel']} | |")
            continue
        vs = f"{r['vs_ffcv_raw']:.2f}x" if r.get("vs_ffcv_raw") else ""
        mae = f"{r['mae_vs_pil']:.2f}" if r.get("mae_vs_pil") is not None else ""
        lines.append(f"| {r['name']} | {r.get('version', '')} | {r['res']} | {r['img_per_s']:,.0f} | {vs} | "
                     f"{r['dtype']} | {r['kernel']} | {mae} |")
    return "\n".join(lines) + "\n"


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.peers", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="packed data set (python -m fasttin.pack)")
    p.add_argument("--split", default="val")
    p.add_argument("--res", default="64,224", help="comma-separated resolutions (default 64,224)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--rounds", type=int, default=7, help="timed epochs per loader, alternating (median reported)")
    p.add_argument("--workers", type=int, default=2, help="threads or worker processes of every loader")
    p.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16",
                   help="half type of the loaders that can choose (FFCV and DALI give float16)")
    p.add_argument("--mae-images", type=int, default=500, help="first N images for the MAE against PIL bicubic")
    p.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated subset of: {', '.join(PEERS)}")
    p.add_argument("--cache", default="bench-out/cache/peers", help="where each peer's input is prepared once")
    p.add_argument("--ffcv-site", type=Path, default=DEFAULT_SITE,
                   help="folder FFCV was installed into by benchmarks/peers/setup-ffcv.sh")
    p.add_argument("--timeout", type=float, default=1800, help="seconds a worker may take for one answer")
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    from fasttin.info import dated_environment
    try:
        resolutions = [int(r) for r in args.res.split(",")]
    except ValueError:
        print(f"benchmarks.peers: error: --res must be comma-separated integers, got {args.res!r}", file=sys.stderr)
        return EXIT_BAD_INPUT
    command = "python -m benchmarks.peers " + " ".join(sys.argv[1:] if argv is None else argv)
    env = dated_environment()
    try:
        for out in (args.json, args.markdown):
            if out:
                ensure_writable(out)
        records = run_peers(args.data, args.split, resolutions, batch_size=args.batch_size, rounds=args.rounds,
                            workers=args.workers, dtype=args.dtype, cache=args.cache, mae_images=args.mae_images,
                            peers=args.peers.split(","), ffcv_site=args.ffcv_site, timeout_s=args.timeout)
        if args.json:
            write_atomic(args.json, json.dumps({"environment": env, "command": command, "records": records},
                                               indent=1).encode())
        if args.markdown:
            write_atomic(args.markdown, markdown(records, env, command).encode())
    except UserError as e:  # OutputError is one
        print(f"benchmarks.peers: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(markdown(records, env, command))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
