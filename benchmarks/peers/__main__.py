"""python -m benchmarks.peers: fasttin's loaders side by side with FFCV, DALI, torchvision and the
classic pipeline, loader only, in one run on this machine (see benchmarks.peers.runner)."""
from __future__ import annotations

import sys
from pathlib import Path

from benchmarks.peers.loaders import PEERS
from benchmarks.peers.runner import DEFAULT_SITE, run_peers
from benchmarks.run import resolutions
from benchmarks.runner import envelope
from benchmarks.writers import markdown
from fasttin.errors import EXIT_OK, CommandParser, run_command
from fasttin.fileio import ensure_writable, write_atomic, write_json_atomic
from fasttin.recipes import count


def _mae(r: dict) -> str:
    return "" if r.get("mae_vs_pil") is None else f"{r['mae_vs_pil']:.2f}"


COLUMNS = (("loader", lambda r: r["name"]), ("version", lambda r: r.get("version", "")), ("res", lambda r: r["res"]),
           ("img/s", lambda r: f"skipped: {r['skipped']}" if r.get("skipped") else f"{r['img_per_s']:,.0f}"),
           ("vs FFCV raw", lambda r: f"{r['vs_ffcv_raw']:.2f}x" if r.get("vs_ffcv_raw") else ""),
           ("out", lambda r: r.get("dtype") or ""), ("kernel", lambda r: r["kernel"]),
           ("MAE vs PIL bicubic (0-255)", _mae))


def parse(argv):
    p = CommandParser("benchmarks.peers", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="packed data set (python -m fasttin.pack)")
    p.add_argument("--split", default="val")
    p.add_argument("--res", type=resolutions, default="64,224", help="comma-separated resolutions (default 64,224)")
    p.add_argument("--batch-size", type=count("batch_size"), default=100)
    p.add_argument("--rounds", type=count("rounds"), default=7,
                   help="timed epochs per loader, alternating (median reported)")
    p.add_argument("--workers", type=count("workers"), default=2, help="threads or worker processes of every loader")
    p.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16",
                   help="half type of the loaders that can choose (FFCV and DALI give float16)")
    p.add_argument("--mae-images", type=count("mae_images"), default=500,
                   help="first N images for the MAE against PIL bicubic")
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

    def body() -> int:
        for out in (args.json, args.markdown):
            if out:
                ensure_writable(out)
        records = run_peers(args.data, args.split, args.res, batch_size=args.batch_size, rounds=args.rounds,
                            workers=args.workers, dtype=args.dtype, cache=args.cache, mae_images=args.mae_images,
                            peers=args.peers.split(","), ffcv_site=args.ffcv_site, timeout_s=args.timeout)
        record = envelope("benchmarks.peers", argv, records=records)
        if args.json:
            write_json_atomic(args.json, record)
        if args.markdown:
            write_atomic(args.markdown, markdown(record, COLUMNS).encode())
        print(markdown(record, COLUMNS))
        return EXIT_OK
    return run_command("benchmarks.peers", body)


if __name__ == "__main__":
    sys.exit(main())
