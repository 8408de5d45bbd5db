"""Measure the packing target: pack time / time of a plain Python loop reading every JPEG member.

Usage: python tools/pack_ratio.py ZIP [--out DIR] [--repeats 2]
Runs both alternately in one process tree on the same machine and prints the ratio (target <= 4).
"""
import argparse
import shutil
import statistics
import tempfile
import time
import zipfile

from fasttin.pack import pack


def read_loop(path):
    with zipfile.ZipFile(path) as z:
        n = 0
        for name in z.namelist():
            if name.endswith(".JPEG"):
                n += len(z.read(name))
    return n


def main():
    p = argparse.ArgumentParser()
    p.add_argument("zip")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    reads, packs = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        read_loop(args.zip)
        reads.append(time.perf_counter() - t)
        out = tempfile.mkdtemp(prefix="fasttin-ratio-")
        t = time.perf_counter()
        pack(args.zip, out, quiet=True)
        packs.append(time.perf_counter() - t)
        shutil.rmtree(out)
    r, k = statistics.median(reads), statistics.median(packs)
    print(f"read loop {r:.2f} s (runs {', '.join(f'{x:.2f}' for x in reads)}); "
          f"pack {k:.2f} s (runs {', '.join(f'{x:.2f}' for x in packs)}); ratio {k / r:.2f} (target <= 4)")


if __name__ == "__main__":
    main()
