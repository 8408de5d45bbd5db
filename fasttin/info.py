"""python -m fasttin.info: what this machine offers fasttin (versions, GPU, pillow-simd, cores)."""
from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

from fasttin.errors import UserError
from fasttin.machine import cpu_support


class DeviceError(UserError):
    """A --device this machine does not have (a typo, "tpu", cuda without a GPU, cuda:3 of 2)."""


def resolve_device(name: str | None):
    """The torch.device for a --device value: None means cuda when there is one, else cpu.
    A device this machine lacks is a DeviceError naming it and what is available."""
    import torch
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    have = "cpu" if gpus == 0 else "cpu and cuda" if gpus == 1 else f"cpu and cuda:0 to cuda:{gpus - 1}"
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise DeviceError(f"--device {name}: not a device name; this machine has {have}") from None
    if device.type not in ("cpu", "cuda"):
        raise DeviceError(f"--device {name}: fasttin runs on cpu or cuda; this machine has {have}")
    if device.type == "cuda" and (device.index or 0) >= gpus:
        raise DeviceError(f"--device {name}: no such CUDA device here; this machine has {have}")
    return device


def pillow_simd() -> bool:
    """pillow-simd marks its version with '.postN' on top of the Pillow release it forks."""
    import PIL
    return ".post" in PIL.__version__


SIMD = ("avx2", "avx512f", "avx512_bf16", "amx_tile")  # the flags that move CPU throughput the most


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU as /proc/cpuinfo names it, with its family, model and widest SIMD flags (a shared
    machine may land on another CPU from one day to the next; a record must say which it ran on);
    platform's word for it where there is no /proc/cpuinfo."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    first = dict(line.split(":", 1) for line in cpuinfo.split("\n\n")[0].splitlines() if ":" in line)
    first = {k.strip(): v.strip() for k, v in first.items()}
    if "model name" not in first:
        return platform.processor() or platform.machine()
    flags = [f for f in SIMD if f in first.get("flags", "").split()]
    return (f"{first['model name']} (family {first.get('cpu family', '?')}, model {first.get('model', '?')}"
            + (f"; {' '.join(flags)}" if flags else "") + ")")


def git_commit() -> str | None:
    """The commit of the fasttin checkout that runs ('-dirty' when it has uncommitted changes), or
    None outside a git checkout: what a record must name to be re-run. An installed fasttin (a
    wheel in a venv that happens to lie inside some checkout) has no commit: that checkout's is not
    the code that runs."""
    import subprocess
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    try:
        r = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=40"],
                           capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() or None if r.returncode == 0 else None


def environment() -> dict:
    """One dict of facts, shared by the info command, run configs and benchmark records."""
    import numpy
    import PIL
    import torch
    import torchvision
    try:
        import nvidia.dali as dali
        dali_version = dali.__version__
    except Exception as e:  # not installed, or a CUDA library missing
        dali_version = f"unavailable ({type(e).__name__})"
    cuda = torch.cuda.is_available()
    cpu = cpu_support()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "dali": dali_version,
        "numpy": numpy.__version__,
        "pillow": PIL.__version__,
        "pillow_simd": pillow_simd(),
        "cuda_build": torch.version.cuda,
        "cuda_available": cuda,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "cpu": cpu_model(),
        "cpu_class": cpu.label,  # what the training step's kernels have: AVX2, AVX512-BF16, AMX-BF16...
        "cores": os.cpu_count(),
        "usable_cores": cpu.cores,
        "platform": platform.platform(),
        "commit": git_commit(),
    }


def dated_environment() -> dict:
    """environment() with the UTC date and minute: the stamp every benchmark record carries."""
    return {**environment(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def main(argv=None) -> int:
    from fasttin.errors import CommandParser
    p = CommandParser("fasttin.info", description=__doc__)
    p.add_argument("--main-job", action="store_true", help="print the recipe tools/run.sh trains here, and why")
    args = p.parse_args(argv)
    if args.main_job:
        return main_job()
    from rich.console import Console
    from rich.table import Table

    table = Table(title="fasttin environment", show_header=False)
    for k, v in environment().items():
        table.add_row(k, str(v))
    Console().print(table)
    return 0


def main_job() -> int:
    """stdout: the recipe the main job trains here (seed-224 with a CUDA device, fast-cpu without);
    stderr: the line saying why, and how to get the other."""
    import torch
    if torch.cuda.is_available():
        print("seed-224")
        return 0
    from fasttin.tuning import main_job_note
    print("fast-cpu")
    print(main_job_note(), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
