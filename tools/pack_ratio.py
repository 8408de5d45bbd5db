"""Measure the packing target: pack time / time of a plain Python loop reading every JPEG member.

Usage: python tools/pack_ratio.py ZIP [--repeats 2]
Runs both in turn in one process on the same machine, each going first in turn (runner.rotation),
and prints the ratio of the medians (target <= 4).
"""
import shutil
import statistics
import sys
import tempfile
import time
import zipfile

from benchmarks.runner import rotation
from fasttin.errors import EXIT_OK, CommandParser, UserError, run_command
from fasttin.pack import pack
from fasttin.recipes import count


def read_loop(path):
    with zipfile.ZipFile(path) as z:
        n = 0
        for name in z.namelist():
            if name.endswith(".JPEG"):
                n += len(z.read(name))
    return n


def main(argv=None) -> int:
    p = CommandParser("tools.pack_ratio", description=__doc__.split("\n\n")[0])
    p.add_argument("zip", help="the Tiny-ImageNet zip")
    p.add_argument("--repeats", type=count("repeats"), default=2)
    args = p.parse_args(argv)
    return run_command("tools.pack_ratio", lambda: measure(args))


def measure(args) -> int:
    if not zipfile.is_zipfile(args.zip):  # False for a missing or unreadable file too
        raise UserError(f"{args.zip}: not a readable zip file")
    times = {"read": [], "pack": []}
    for i in range(args.repeats):
        for side in rotation(list(times), i):
            out = tempfile.mkdtemp(prefix="fasttin-ratio-")
            t = time.perf_counter()
            if side == "read":
                read_loop(args.zip)
            else:
                pack(args.zip, out, quiet=True)
            times[side].append(time.perf_counter() - t)
            shutil.rmtree(out)
    reads, packs = times["read"], times["pack"]
    r, k = statistics.median(reads), statistics.median(packs)
    print(f"read loop {r:.2f} s (runs {', '.join(f'{x:.2f}' for x in reads)}); "
          f"pack {k:.2f} s (runs {', '.join(f'{x:.2f}' for x in packs)}); ratio {k / r:.2f} (target <= 4)")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
