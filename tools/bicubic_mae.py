"""How far apart the bicubic upscales are: each backend, PIL, OpenCV and torch, on real images.

Usage: python tools/bicubic_mae.py DATA [--res 224] [--n 256]
Prints the mean absolute error (0-255 scale) of every kernel against PIL's and OpenCV's upscale
of the same decoded 64x64 images, OpenCV's INTER_AREA included (FFCV resizes with it). The error
is benchmarks.peers.mae's, the one the peers benchmark reports.
"""
import sys

import cv2
import numpy as np
import torch

from benchmarks.peers import mae
from fasttin.errors import EXIT_OK, CommandParser, run_command
from fasttin.loaders import make_loader
from fasttin.recipes import MAX_RES, MIN_RES, Setting, count, flag_type
from fasttin.shards import open_split


def main(argv=None) -> int:
    p = CommandParser("tools.bicubic_mae", description=__doc__.split("\n\n")[0])
    p.add_argument("data", help="a packed data set (its val split)")
    p.add_argument("--res", type=flag_type(Setting("res", None, int, "", minimum=MIN_RES, below=MAX_RES + 1)),
                   default=224)
    p.add_argument("--n", type=count("n"), default=256, help="images (at most the split's)")
    a = p.parse_args(argv)
    return run_command("tools.bicubic_mae", lambda: compare(a))


def compare(a) -> int:
    ds = open_split(a.data, "val")  # a FormatError names the folder: one line
    a.n = min(a.n, len(ds))
    src, r = ds.images(np.arange(a.n)), a.res
    ref = {"PIL BICUBIC": mae.reference(ds, a.n, r),
           "OpenCV INTER_CUBIC": np.stack([cv2.resize(x, (r, r), interpolation=cv2.INTER_CUBIC) for x in src])}
    t = torch.from_numpy(src).permute(0, 3, 1, 2).float()
    out = {"torch bicubic (a=-0.75)": torch.nn.functional.interpolate(t, (r, r), mode="bicubic").clamp(0, 255)
           .round().permute(0, 2, 3, 1).numpy(),
           "OpenCV INTER_AREA (FFCV)": np.stack([cv2.resize(x, (r, r), interpolation=cv2.INTER_AREA) for x in src]),
           **ref}
    for backend in ("resident", "pil", "dali"):
        ld = make_loader(a.data, "val", backend=backend, res=r, batch_size=a.n, device="cpu", shuffle=False,
                         dtype=torch.float32, workers=1)
        out[f"fasttin {backend}"] = mae.to_pixels(next(iter(ld))[0])
    print(f"mean absolute error, 0-255 scale, {a.n} val images upscaled 64 -> {r}")
    print(f"{'':28s}" + "".join(f"{k:>22s}" for k in ref))
    for name, x in out.items():
        print(f"{name:28s}" + "".join(f"{mae.mean_abs_error(np.asarray(x, np.float64), y):22.3f}"
                                      for y in ref.values()))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
