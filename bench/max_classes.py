"""Largest class count whose Partial FC head step fits in a memory budget (bisection, one subprocess per probe).

    python bench/max_classes.py --memory-gb 4 --sample-rate 0.1 --batch 128 [--backend paddle]

Each probe runs bench/partial_fc.py (W=1, 2 steps, momentum resident) in a fresh process and reads its peak memory:
the process's peak RSS on CPU (it includes Paddle's own ~300 MB), or paddle's max allocated GPU memory when a GPU is
present. As PLSC's find_maximum_classes, the answer is a count that fits next to one that does not (within
--tolerance). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BENCH = Path(__file__).resolve().with_name("partial_fc.py")
STATE_BYTES_PER_CLASS = 2 * 4  # weight + momentum, float32, per embedding dimension


def peak_bytes(num_classes: int, sample_rate: float, batch: int, dim: int, backend: str) -> float:
    """Peak memory (bytes) of a head step with num_classes classes, measured in a subprocess."""
    cmd = [sys.executable, str(BENCH), "--num-classes", str(num_classes), "--sample-rate", str(sample_rate),
           "--batch", str(batch), "--dim", str(dim), "--steps", "1", "--backend", backend]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return float("inf")  # killed or out of memory: does not fit
    result = json.loads(lines[-1])
    return result.get("gpu_peak_mb", result["peak_rss_mb"]) * 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory-gb", type=float, required=True, help="budget in GiB")
    parser.add_argument("--sample-rate", type=float, default=0.1)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--tolerance", type=float, default=0.02, help="relative width of the final interval")
    parser.add_argument("--backend", choices=("numpy", "paddle"), default="numpy", help="the Partial FC backend")
    args = parser.parse_args()
    budget = args.memory_gb * 2**30
    low, high = 0, int(budget / (STATE_BYTES_PER_CLASS * args.dim)) + 1  # the state alone cannot exceed the budget
    probes = []
    while high - low > max(1, args.tolerance * max(low, 1)):
        mid = (low + high) // 2
        peak = peak_bytes(mid, args.sample_rate, args.batch, args.dim, args.backend)
        probes.append({"num_classes": mid, "peak_mb": round(peak / 2**20, 1)})
        print(f"{mid:>12,d} classes: peak {peak / 2**30:.2f} GiB -> {'fits' if peak <= budget else 'too big'}",
              file=sys.stderr, flush=True)
        if peak <= budget:
            low = mid
        else:
            high = mid
    print(json.dumps({"bench": "max_classes", "backend": args.backend, "memory_gb": args.memory_gb,
                      "sample_rate": args.sample_rate,
                      "batch": args.batch, "dim": args.dim, "max_classes": low, "first_too_big": high,
                      "probes": probes}), flush=True)


if __name__ == "__main__":
    main()
