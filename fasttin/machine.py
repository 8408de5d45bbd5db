"""What this machine's processor can do for a training step: its instruction set as torch and
oneDNN use it, whether bf16 runs on instructions of its own, and how many cores this process may use.

The facts come from torch and oneDNN themselves, so that the caps a user or a test sets
(ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2) are seen as the kernels see them: an AVX-512
machine capped so behaves as an AVX2 one (BENCHMARKS.md measures both).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

# oneDNN's ISA caps (ONEDNN_MAX_CPU_ISA) below the first with bf16 instructions (avx512_core_bf16)
_CAPS_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


@dataclass(frozen=True)
class CpuSupport:
    """isa: torch's kernels' capability (AVX2, AVX512, ...); bf16: "native" (AVX512-BF16 or AMX-BF16
    instructions, or aarch64's BF16), "emulated" (oneDNN runs bf16 without them: AVX-512 before
    bf16), or "none" (no fast bf16 kernels: AVX2 and below); amx: AMX-BF16 tiles; fp16: fast fp16
    (AVX512-FP16 or AMX-FP16); cores: those this process may use."""

    isa: str
    bf16: str
    amx: bool = False
    fp16: bool = False
    cores: int = 1

    @property
    def label(self) -> str:
        """The CPU class records and messages name: AMX-BF16, AVX512-BF16, AVX512, AVX2..."""
        if self.amx:
            return "AMX-BF16"
        if self.bf16 == "native":
            return f"{self.isa}-BF16" if self.isa.startswith("AVX") else f"{self.isa} with BF16"
        return self.isa


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The first processor's flags in /proc/cpuinfo (x86 'flags', aarch64 'Features'); empty where
    there is no such file."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cpu_support(flags: set[str] | None = None) -> CpuSupport:
    """The processor as the training step's kernels see it, ISA caps included."""
    import torch
    flags = cpu_flags() if flags is None else flags
    isa = torch.backends.cpu.get_cpu_capability()
    onednn = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    capped = cap in _CAPS_WITHOUT_BF16
    has = {"avx512_bf16", "amx_bf16", "bf16"} & flags
    bf16 = "none" if not onednn else "native" if has and not capped else "emulated"
    amx = bf16 == "native" and "amx_bf16" in flags and (not cap or "AMX" in cap or cap in ("ALL", "DEFAULT"))
    fp16 = bool({"avx512_fp16", "amx_fp16"} & flags) and not capped and (not cap or "FP16" in cap or cap == "ALL")
    return CpuSupport(isa=isa, bf16=bf16, amx=amx, fp16=fp16, cores=usable_cores())


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity, within a container's CPU quota
    (cgroup v2 cpu.max or v1 cfs quota), where os.cpu_count() would count the whole host."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(n, math.ceil(quota)) if quota else n)


def _cgroup_quota() -> float | None:
    """CPUs' worth of this container's quota, None where there is none (or it cannot be read)."""
    try:
        text = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if text and text[0] != "max":
            return int(text[0]) / int(text[1])
        return None
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def cuda_bf16(device) -> bool:
    """Whether the CUDA device computes bf16 on units of its own (compute capability 8.0 on: Ampere,
    Hopper...); a V100 or T4 would emulate it."""
    import torch
    return torch.cuda.get_device_properties(device).major >= 8
