"""What this machine computes fast: the dtype choice for the engine and for training.

bf16 is fast on GPUs and on CPUs with native bf16 (AVX512-BF16 or AMX); elsewhere torch emulates it and
a bf16 matmul runs hundreds of times slower than fp32 (measured on an AVX2-only EPYC: fp32 64 GFLOP/s,
bf16 0.3 GFLOP/s). So ``"auto"`` picks bf16 only where the hardware has it.
"""

from __future__ import annotations

import functools

import torch

DTYPES = ("auto", "bfloat16", "float16", "float32")


@functools.cache
def cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    words = set(flags.split())
    return bool({"avx512_bf16", "amx_bf16"} & words)


def resolve_dtype(name: str, device: str | torch.device = "cpu") -> torch.dtype:
    """``"auto"`` -> bf16 on CUDA and on CPUs with native bf16, else fp32."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: choose one of {', '.join(DTYPES)}")
    if name != "auto":
        return getattr(torch, name)
    if torch.device(device).type == "cuda" or cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def process_memory_mib() -> dict[str, float]:
    """VmRSS (resident now) and VmHWM (peak resident since start or the last ``clear_refs`` reset) of
    this process, in MiB, from /proc/self/status (Linux)."""
    from pathlib import Path

    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024  # kB
    return values
