"""Partial FC head speed and memory: forward + backward + sparse update of the head alone, random 512-d embeddings.

    python bench/partial_fc.py --num-classes 1000000 --sample-rate 0.1 --batch 128 --steps 5 --backend numpy,paddle

One process per measurement (W=1), SGD momentum 0.9, wd 5e-4, ArcFace s=64 m=0.5. The optimizer state is resident
from the start, so the memory figures are the worst case (every row already updated). Prints one JSON line per
measurement: ms/step (min, median; wall clock), the median forward / backward / step split, CPU ms/step (all threads),
the 1-minute load average (the machine may be shared), peak RSS, RSS before the head was built, peak KB per class
above that baseline, resident state bytes per class, and the head's own per-step estimate from the shapes
(PartialFC.memory_plan, what train.py prints). BLAS threads: --threads (default: all cores), set before NumPy loads.

Several backends (--backend numpy,paddle) run side by side: each in its own process, interleaved --repeats times,
then one summary line with the median ratio to the first backend (the same load for all, so the ratio is the figure
to trust on a busy machine). --breakdown adds the paddle backend's main operations timed one by one at these shapes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
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


def _ms(values: list[float]) -> float:
    return round(statistics.median(values) * 1000, 1)


def run(num_classes: int, sample_rate: float, batch: int, steps: int, dim: int, threads: int,
        backend: str = "numpy") -> dict:
    import numpy as np
    import paddle

    from losses import CombinedMarginLoss
    from partial_fc import PartialFC

    rng = np.random.default_rng(0)
    baseline = rss_mb()
    pfc = PartialFC(CombinedMarginLoss(64.0, 1.0, 0.5, 0.0), dim, num_classes, sample_rate=sample_rate,
                    backend=backend)
    if backend == "numpy":
        pfc.head.threads = threads
        for state in pfc.opt_state.values():
            state.fill(0.0)  # np.zeros pages are mapped lazily: resident from the start, as in a long run
    times, cpu, phases = [], [], {"forward": [], "backward": [], "step": []}
    for _ in range(steps + 1):  # + 1 warm-up step (first-touch of the reusable buffers)
        x = paddle.to_tensor(rng.standard_normal((batch, dim), dtype=np.float32), stop_gradient=False)
        y = paddle.to_tensor(rng.integers(0, num_classes, batch))
        start, start_cpu = time.perf_counter(), time.process_time()
        loss = pfc(x, y)
        forward = time.perf_counter()
        loss.backward()
        backward = time.perf_counter()
        pfc.step(0.1)
        end = time.perf_counter()
        times.append(end - start)
        cpu.append(time.process_time() - start_cpu)
        for name, seconds in zip(phases, (forward - start, backward - forward, end - backward), strict=True):
            phases[name].append(seconds)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    plan = pfc.memory_plan(batch)
    result = {"bench": "partial_fc", "backend": backend, "num_classes": num_classes, "sample_rate": sample_rate,
              "batch": batch, "dim": dim, "steps": steps, "threads": threads,
              "ms_per_step_min": round(min(times[1:]) * 1000, 1), "ms_per_step_median": _ms(times[1:]),
              **{f"{name}_ms_median": _ms(values[1:]) for name, values in phases.items()},
              "cpu_ms_per_step_median": _ms(cpu[1:]),
              "load_avg_1min": os.getloadavg()[0], "peak_rss_mb": round(peak, 1), "baseline_rss_mb": round(baseline, 1),
              "peak_kb_per_class": round((peak - baseline) * 1024 / num_classes, 3),
              "state_bytes_per_class": plan["state_bytes_per_class"],
              "planned_step_peak_mb": round(plan["step_peak_bytes"] / 2**20, 1), "loss": round(float(loss), 4)}
    if paddle.is_compiled_with_cuda() and paddle.get_device().startswith("gpu"):
        result["gpu_peak_mb"] = round(paddle.device.cuda.max_memory_allocated() / 2**20, 1)
    return result


def breakdown(num_classes: int, sample_rate: float, batch: int, dim: int, repeats: int = 3) -> dict:
    """The paddle backend's main operations one by one at these shapes (median ms): where its step time goes."""
    import numpy as np
    import paddle

    from pfc import sampling
    from pfc.paddle_head import _row_norms

    size = sampling.sample_size(num_classes, sample_rate, batch)
    weight = paddle.randn([num_classes, dim]) * 0.01
    labels = paddle.to_tensor(np.random.default_rng(0).integers(0, num_classes, batch))
    keys = sampling.draw_keys(0, 0, 1)
    idx = sampling.choose_paddle(labels, num_classes, size, keys)
    idx = paddle.arange(num_classes) if idx is None else idx
    rows, emb = paddle.index_select(weight, idx), paddle.randn([batch, dim])
    cos = paddle.matmul(emb, rows, transpose_y=True)
    ops = {"scores (hash)": lambda: sampling.scores_paddle(num_classes + 1, keys),
           "sample (scores + top-k + sort)": lambda: sampling.choose_paddle(labels, num_classes, size, keys),
           "gather rows (index_select)": lambda: paddle.index_select(weight, idx),
           "row norms (einsum)": lambda: _row_norms(rows),
           "row norms (paddle.linalg.norm)": lambda: paddle.linalg.norm(rows, axis=1),
           "logits matmul [N,D]x[D,S]": lambda: paddle.matmul(emb, rows, transpose_y=True),
           "exp [N,S]": lambda: paddle.exp(cos),
           "embedding grad matmul [N,S]x[S,D]": lambda: paddle.matmul(cos, rows),
           "head grad matmul [S,N]x[N,D]": lambda: paddle.matmul(cos, emb, transpose_x=True),
           "elementwise [S,D] into a new tensor": lambda: rows * 0.9,
           "elementwise [S,D] in place": lambda: rows.scale_(1.0),
           "scatter rows (scatter_)": lambda: paddle.scatter_(weight, idx, rows)}
    out = {}
    for name, fn in ops.items():
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        out[name] = _ms(times)
    return {"bench": "partial_fc_paddle_breakdown", "num_classes": num_classes, "sample_rate": sample_rate,
            "batch": batch, "dim": dim, "sampled": size, "ms_median": out, "load_avg_1min": os.getloadavg()[0]}


def side_by_side(args: argparse.Namespace, backends: list[str]) -> None:
    """Each backend in its own process, interleaved; one JSON line per run, then the median ratios."""
    runs: dict[str, list[dict]] = {b: [] for b in backends}
    for _ in range(args.repeats):
        for backend in backends:
            cmd = [sys.executable, __file__, "--num-classes", str(args.num_classes), "--sample-rate",
                   str(args.sample_rate), "--batch", str(args.batch), "--steps", str(args.steps), "--dim",
                   str(args.dim), "--threads", str(args.threads), "--backend", backend]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs[backend].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(runs[backend][-1]), flush=True)
    first = backends[0]
    summary = {"bench": "partial_fc_side_by_side", "num_classes": args.num_classes, "sample_rate": args.sample_rate,
               "batch": args.batch, "repeats": args.repeats}
    for backend in backends:
        for key in ("ms_per_step_median", "cpu_ms_per_step_median", "peak_kb_per_class"):
            summary[f"{backend}_{key}"] = statistics.median(r[key] for r in runs[backend])
        if backend != first:
            summary[f"{backend}_over_{first}_ms"] = round(statistics.median(
                b["ms_per_step_median"] / a["ms_per_step_median"] for a, b in zip(runs[first], runs[backend],
                                                                                  strict=True)), 2)
    print(json.dumps(summary), flush=True)


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
    from utils.cpu import prefer_avx2_mkl
    prefer_avx2_mkl()  # before any Paddle math (utils/cpu.py)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-classes", type=int, required=True)
    parser.add_argument("--sample-rate", type=float, default=0.1)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--backend", default="numpy",
                        help="numpy | paddle, or a comma-separated list to run side by side (interleaved processes)")
    parser.add_argument("--repeats", type=int, default=2, help="side by side: runs of each backend")
    parser.add_argument("--breakdown", action="store_true", help="time the paddle backend's main operations")
    parser.add_argument("--torch-reference", action="store_true",
                        help="time the arcface_torch-style dense step in PyTorch instead (needs torch)")
    args = parser.parse_args()
    backends = args.backend.split(",")
    if any(b not in ("numpy", "paddle") for b in backends):
        parser.error(f"--backend {args.backend}: each must be numpy or paddle")
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    os.environ.setdefault("GLOG_minloglevel", "2")
    if args.breakdown:
        print(json.dumps(breakdown(args.num_classes, args.sample_rate, args.batch, args.dim)), flush=True)
    elif args.torch_reference:
        print(json.dumps(run_torch(args.num_classes, args.sample_rate, args.batch, args.steps, args.dim,
                                   args.threads)), flush=True)
    elif len(backends) > 1:
        side_by_side(args, backends)
    else:
        print(json.dumps(run(args.num_classes, args.sample_rate, args.batch, args.steps, args.dim, args.threads,
                             backends[0])), flush=True)


if __name__ == "__main__":
    main()
