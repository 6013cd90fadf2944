"""CPU runtime setting that makes Paddle's convolutions and matmuls 2-3x faster on AMD processors.

Paddle's CPU wheel bundles an MKL that, on non-Intel CPUs, dispatches to its generic SSE kernels. The MKL switch
MKL_DEBUG_CPU_TYPE=5 selects the AVX2 kernels instead: on this project's AMD EPYC test machine a 1x1 conv ran
2.2x faster, a 3x3 conv 2.9x, an mbf training step 1.65x (bench/RESULTS.md). MKL reads the variable at
its first call, so it must be set before any Paddle math runs; an explicit setting (even empty, to opt out) wins.

Importing the package changes nothing: each program's main() calls `prefer_avx2_mkl()` first (train.py, the
tools, model_test, the converter, the benchmarks), so a library user or a test process keeps its environment.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from pathlib import Path


def cpu_vendor() -> str:
    """'AuthenticAMD', 'GenuineIntel', ... from /proc/cpuinfo; '' where that file does not exist."""
    try:
        with open(Path("/proc/cpuinfo")) as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def prefer_avx2_mkl(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Set MKL_DEBUG_CPU_TYPE=5 in `environ` on AMD CPUs unless it is already set; True if it was set here.

    Child processes inherit it, so every process of a run (ranks, DataLoader workers) picks the same kernels.
    """
    if "MKL_DEBUG_CPU_TYPE" in environ or cpu_vendor() != "AuthenticAMD":
        return False
    environ["MKL_DEBUG_CPU_TYPE"] = "5"
    return True
