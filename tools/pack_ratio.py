"""Measure the packing target: pack time / time of a plain Python loop reading every JPEG member.

Usage: python tools/pack_ratio.py ZIP [--repeats 2]
Runs both in turn in one process on the same machine, each going first in turn (runner.rotation),
and prints the ratio of the medians (target <= 4).
"""
import argparse
import shutil
import statistics
import tempfile
import time
import zipfile

from benchmarks.runner import rotation
from fasttin.pack import pack


def read_loop(path):
    with zipfile.ZipFile(path) as z:
        n = 0
        for name in z.namelist():
            if name.endswith(".JPEG"):
                n += len(z.read(name))
    return n


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("zip")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
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


if __name__ == "__main__":
    main()
