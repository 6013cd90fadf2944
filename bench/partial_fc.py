"""Partial FC head speed and memory: forward + backward + sparse update of the head alone, random 512-d embeddings.

    python bench/partial_fc.py --num-classes 1000000 --sample-rate 0.1 --batch 128 --steps 5

One process (W=1), SGD momentum 0.9, wd 5e-4, ArcFace s=64 m=0.5. The momentum is touched at start, so the memory
figures are the worst case (every row already updated). Prints ONE JSON line: ms/step (min, median; wall clock)
and CPU ms/step (all threads), the 1-minute load average (the machine may be shared), peak RSS, RSS
before the head was built, peak KB per class above that baseline, and resident state bytes per class (weight +
optimizer state). BLAS threads: --threads (default: all cores), set before NumPy loads.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def rss_mb() -> float:
    """Current resident set size (MiB), from /proc (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run(num_classes: int, sample_rate: float, batch: int, steps: int, dim: int, threads: int) -> dict:
    import numpy as np
    import paddle

    from losses import CombinedMarginLoss
    from partial_fc import PartialFC

    rng = np.random.default_rng(0)
    baseline = rss_mb()
    pfc = PartialFC(CombinedMarginLoss(64.0, 1.0, 0.5, 0.0), dim, num_classes, sample_rate=sample_rate)
    pfc.threads = threads
    for state in pfc.opt_state.values():
        state.fill(0.0)  # resident from the start: the figure is the steady state of a long run
    times, cpu = [], []
    for _ in range(steps + 1):  # + 1 warm-up step (first-touch of the reusable buffers)
        x = paddle.to_tensor(rng.standard_normal((batch, dim), dtype=np.float32), stop_gradient=False)
        y = paddle.to_tensor(rng.integers(0, num_classes, batch))
        start, start_cpu = time.perf_counter(), time.process_time()
        loss = pfc(x, y)
        loss.backward()
        pfc.step(0.1)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    state_bytes = pfc.weight.nbytes + sum(s.nbytes for s in pfc.opt_state.values())
    result = {"bench": "partial_fc", "num_classes": num_classes, "sample_rate": sample_rate, "batch": batch,
            "dim": dim, "steps": steps, "threads": threads,
            "ms_per_step_min": round(min(times[1:]) * 1000, 1),
            "ms_per_step_median": round(statistics.median(times[1:]) * 1000, 1),
            "cpu_ms_per_step_median": round(statistics.median(cpu[1:]) * 1000, 1),
            "load_avg_1min": os.getloadavg()[0], "peak_rss_mb": round(peak, 1), "baseline_rss_mb": round(baseline, 1),
            "peak_kb_per_class": round((peak - baseline) * 1024 / num_classes, 3),
            "state_bytes_per_class": state_bytes / num_classes, "loss": round(float(loss), 4)}
    if paddle.is_compiled_with_cuda() and paddle.get_device().startswith("gpu"):
        result["gpu_peak_mb"] = round(paddle.device.cuda.max_memory_allocated() / 2**20, 1)
    return result


def run_torch(num_classes: int, sample_rate: float, batch: int, steps: int, dim: int, threads: int) -> dict:
    """The same step the way arcface_torch's PartialFC_V2 does it (a side-by-side reference under the same load):
    a dense Parameter, torch.rand + topk sampling, normalize + linear, the ArcFace margin under no_grad, softmax
    cross-entropy by autograd, dense SGD (momentum 0.9, wd 5e-4) on the whole matrix. Written here from that
    description (torch is a test-only dependency)."""
    import torch

    torch.set_num_threads(threads)
    baseline = rss_mb()
    weight = torch.nn.Parameter(torch.normal(0, 0.01, (num_classes, dim)))
    opt = torch.optim.SGD([weight], lr=0.1, momentum=0.9, weight_decay=5e-4)
    num_sample = int(sample_rate * num_classes)
    times, cpu = [], []
    for _ in range(steps + 1):
        x = torch.randn(batch, dim, requires_grad=True)
        y = torch.randint(0, num_classes, (batch,))
        start, start_cpu = time.perf_counter(), time.process_time()
        if num_sample < num_classes:
            with torch.no_grad():
                positive = torch.unique(y, sorted=True)
                perm = torch.rand(num_classes)
                perm[positive] = 2.0
                index = torch.topk(perm, k=num_sample)[1].sort()[0]
                labels = torch.searchsorted(index, y)
            sampled = weight[index]
        else:
            sampled, labels = weight, y
        logits = torch.nn.functional.linear(torch.nn.functional.normalize(x),
                                            torch.nn.functional.normalize(sampled)).clamp(-1, 1)
        rows = torch.arange(batch)
        with torch.no_grad():
            target = logits[rows, labels].arccos() + 0.5
            logits[rows, labels] = target.cos()
        logits = logits * 64.0
        loss = (torch.logsumexp(logits, 1) - logits[rows, labels]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"bench": "partial_fc_torch_reference", "num_classes": num_classes, "sample_rate": sample_rate,
            "batch": batch, "dim": dim, "steps": steps, "threads": threads,
            "ms_per_step_min": round(min(times[1:]) * 1000, 1),
            "ms_per_step_median": round(statistics.median(times[1:]) * 1000, 1),
            "cpu_ms_per_step_median": round(statistics.median(cpu[1:]) * 1000, 1),
            "load_avg_1min": os.getloadavg()[0], "peak_rss_mb": round(peak, 1), "baseline_rss_mb": round(baseline, 1),
            "peak_kb_per_class": round((peak - baseline) * 1024 / num_classes, 3)}


def main() -> None:
    from backbones.cpu import prefer_avx2_mkl
    prefer_avx2_mkl()  # before any Paddle math (backbones/cpu.py)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-classes", type=int, required=True)
    parser.add_argument("--sample-rate", type=float, default=0.1)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--torch-reference", action="store_true",
                        help="time the arcface_torch-style dense step in PyTorch instead (needs torch)")
    args = parser.parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    os.environ.setdefault("GLOG_minloglevel", "2")
    bench = run_torch if args.torch_reference else run
    result = bench(args.num_classes, args.sample_rate, args.batch, args.steps, args.dim, args.threads)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
