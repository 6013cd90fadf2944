"""Backbone speed on CPU: training step, inference latency and throughput, Paddle dygraph vs the torch reference.

    python bench/backbones.py --networks mbf,r18,r50 --steps 5 --threads 2

Per network, interleaved repetition by repetition so that load from other jobs hits every variant alike:
- train: one step = forward + backward + momentum-SGD step of backbone + a Linear(512, 1000) softmax head, batch 32
- latency: eval-mode forward of one image (ms); throughput: eval-mode forward of a batch of 64 (images/s)
Variants: `paddle` (this project's dygraph), `paddle-F.prelu` (same with Paddle's own PReLU kernel, --plain),
`paddle-inference` (--exported: inference only, the model exported by tools/export.py run by Paddle Inference with
oneDNN), `torch` (tests/torch_reference.py, or tests/torch_vit_reference.py for the ViTs, with torch's eager CPU
kernels; skipped if torch is missing). Medians are printed as a table, ratios against `paddle`, and one JSON line.

    python bench/backbones.py --networks vit_t --exported --steps 3 --threads 2
    python bench/backbones.py --memory --networks vit_t,r50 --batch-size 32   # peak memory, recompute off / on
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CLASSES = 1000


def paddle_runner(name: str, batch: int, numpy_prelu: bool, width: float = 1.0) -> dict[str, Callable[[], None]]:
    import numpy as np
    import paddle

    from backbones import get_model
    from backbones.layers import PReLU

    paddle.seed(0)
    model = get_model(name, width=width)
    head = paddle.nn.Linear(512, CLASSES)
    params = model.parameters() + head.parameters()
    optimizer = paddle.optimizer.Momentum(0.1, 0.9, parameters=params, weight_decay=5e-4)
    rng = np.random.default_rng(0)
    x = paddle.to_tensor(rng.normal(size=(batch, 3, 112, 112)).astype(np.float32))
    y = paddle.to_tensor(rng.integers(0, CLASSES, batch))
    x1, x64 = x[:1], paddle.to_tensor(rng.normal(size=(64, 3, 112, 112)).astype(np.float32))

    def use_prelu(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            PReLU.numpy_on_cpu = numpy_prelu
            try:
                fn()
            finally:
                PReLU.numpy_on_cpu = True
        return run

    def train() -> None:
        model.train()
        loss = paddle.nn.functional.cross_entropy(head(model(x)), y)
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        float(loss)

    def infer(inputs: paddle.Tensor) -> Callable[[], None]:
        def run() -> None:
            model.eval()
            with paddle.no_grad():
                model(inputs).numpy()
        return run

    return {"train": use_prelu(train), "latency": use_prelu(infer(x1)), "throughput": use_prelu(infer(x64))}


def torch_runner(name: str, batch: int) -> dict[str, Callable[[], None]]:
    import torch

    from tests.torch_reference import IResNet, get_torch_model
    from tests.torch_vit_reference import R2060_BLOCKS, VITS, get_torch_vit

    torch.manual_seed(0)
    model = get_torch_vit(name) if name in VITS else IResNet(R2060_BLOCKS) if name == "r2060" else get_torch_model(name)
    head = torch.nn.Linear(512, CLASSES)
    optimizer = torch.optim.SGD([*model.parameters(), *head.parameters()], lr=0.1, momentum=0.9, weight_decay=5e-4)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 112, 112, generator=generator)
    y = torch.randint(0, CLASSES, (batch,), generator=generator)
    x64 = torch.randn(64, 3, 112, 112, generator=generator)

    def train() -> None:
        model.train()
        loss = torch.nn.functional.cross_entropy(head(model(x)), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        loss.item()

    def infer(inputs: torch.Tensor) -> Callable[[], None]:
        def run() -> None:
            model.eval()
            with torch.no_grad():
                model(inputs).numpy()
        return run

    return {"train": train, "latency": infer(x[:1]), "throughput": infer(x64)}


def exported_runner(name: str, threads: int) -> dict[str, Callable[[], None]]:
    """Inference tasks of the model as deployed: tools/export.py's Paddle Inference export (random weights)."""
    import tempfile

    import numpy as np
    import paddle

    from backbones import get_model
    from deploy.embedder import PaddleInferenceEmbedder
    from tools.export import export

    paddle.seed(0)
    directory = Path(tempfile.mkdtemp(prefix="bench_export_"))
    weights = directory / "weights.pdparams"
    paddle.save(get_model(name).state_dict(), str(weights))
    export(name, weights, directory / "exported", ("paddle",))
    predictor = PaddleInferenceEmbedder(directory / "exported", threads=threads)
    rng = np.random.default_rng(0)
    x1, x64 = (rng.normal(size=(n, 3, 112, 112)).astype(np.float32) for n in (1, 64))
    return {"latency": lambda: predictor.forward(x1), "throughput": lambda: predictor.forward(x64)}


def step_memory(name: str, batch: int, recompute: bool) -> dict[str, float]:
    """Resident memory (MB) after building `name`, and the process peak over one training step (a fresh process)."""
    import resource

    import numpy as np
    import paddle

    from backbones import get_model

    def rss_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    paddle.seed(0)
    model = get_model(name, recompute=recompute)
    head = paddle.nn.Linear(512, CLASSES)
    optimizer = paddle.optimizer.Momentum(0.1, 0.9, parameters=model.parameters() + head.parameters())
    x = paddle.to_tensor(np.random.default_rng(0).normal(size=(batch, 3, 112, 112)).astype(np.float32))
    y = paddle.to_tensor(np.zeros(batch, np.int64))
    before = rss_mb()
    paddle.nn.functional.cross_entropy(head(model(x)), y).backward()
    optimizer.step()
    return {"built_mb": before, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def memory_table(networks: list[str], batch: int, threads: int) -> None:
    """Peak memory of one training step without and with recompute, each in its own process."""
    import subprocess

    print(f"# batch {batch}: resident MB after building the model, peak MB over one training step, and the step's "
          f"increase (activations + gradients + optimizer state)")
    print(f"{'network':<10}{'recompute':>10}{'built MB':>10}{'peak MB':>10}{'step MB':>10}", flush=True)
    for name in networks:
        for recompute in (False, True):
            out = subprocess.run([sys.executable, __file__, "--memory-child", name, "--batch-size", str(batch),
                                  "--threads", str(threads), *(["--recompute"] if recompute else [])],
                                 capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"{name:<10}{recompute!s:>10}{r['built_mb']:>10.0f}{r['peak_mb']:>10.0f}"
                  f"{r['peak_mb'] - r['built_mb']:>10.0f}", flush=True)


def profile_step(name: str, batch: int) -> None:
    """Where a Paddle training step spends its time, per operator (forward and backward nodes)."""
    import paddle.profiler as profiler

    train = paddle_runner(name, batch, numpy_prelu=True)["train"]
    train()  # warm-up
    prof = profiler.Profiler(targets=[profiler.ProfilerTarget.CPU])
    prof.start()
    train()
    prof.stop()
    print(f"## {name}, batch {batch}: one training step")
    prof.summary(sorted_by=profiler.SortedKeys.CPUTotal, op_detail=False, thread_sep=False, time_unit="ms",
                 views=[profiler.SummaryView.OperatorView])


def micro(repeats: int = 6) -> None:
    """CPU time of single layers (forward, backward) at mbf's 56x56 stage, batch 16: PReLU kernels, convolutions."""
    import numpy as np
    import paddle
    import paddle.nn.functional as F

    from backbones.layers import _NumpyPReLU

    rng = np.random.default_rng(0)
    x = paddle.to_tensor(rng.normal(size=(16, 128, 56, 56)).astype(np.float32), stop_gradient=False)
    slope = paddle.to_tensor(rng.uniform(0, 0.5, 128).astype(np.float32), stop_gradient=False)
    cases = {"F.prelu": lambda: F.prelu(x, slope), "numpy PReLU": lambda: _NumpyPReLU.apply(x, slope)}
    for label, layer in (("conv1x1 128->128", paddle.nn.Conv2D(128, 128, 1, bias_attr=False)),
                         ("conv3x3 128->128", paddle.nn.Conv2D(128, 128, 3, padding=1, bias_attr=False)),
                         ("depthwise 3x3", paddle.nn.Conv2D(128, 128, 3, padding=1, groups=128, bias_attr=False))):
        cases[label] = lambda layer=layer: layer(x)
    print(f"# [16, 128, 56, 56], CPU time, median of {repeats}, "
          f"MKL_DEBUG_CPU_TYPE={os.environ.get('MKL_DEBUG_CPU_TYPE', '(unset)')!r}")
    for label, fn in cases.items():
        times = []
        for _ in range(repeats):
            x.clear_gradient()
            start = time.process_time()
            y = fn()
            middle = time.process_time()
            y.backward(paddle.ones_like(y))  # full backward: input and weight gradients
            times.append((middle - start, time.process_time() - middle))
        forward, backward = statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)
        print(f"{label:<18} forward {forward * 1e3:7.1f} ms   backward {backward * 1e3:7.1f} ms", flush=True)


def timed(fn: Callable[[], None], clock: Callable[[], float]) -> float:
    start = clock()
    fn()
    return clock() - start


def bench_network(name: str, variants: dict[str, dict[str, Callable[[], None]]], steps: int,
                  latency_runs: int, clock: Callable[[], float]) -> dict[str, dict[str, float]]:
    """Median seconds per task and variant; every repetition runs each variant once, in turn."""
    repeats = {"train": steps, "latency": latency_runs, "throughput": max(1, steps // 2)}
    result: dict[str, dict[str, float]] = {v: {} for v in variants}
    for task, count in repeats.items():
        runners = {v: r[task] for v, r in variants.items() if task in r}  # an exported model does not train
        samples: dict[str, list[float]] = {v: [] for v in runners}
        for run in runners.values():
            run()  # warm-up
        for _ in range(count):
            for variant, run in runners.items():
                samples[variant].append(timed(run, clock))
        for variant, values in samples.items():
            result[variant][task] = statistics.median(values)
    return result


def main(argv: list[str] | None = None) -> None:
    from utils.cpu import prefer_avx2_mkl
    prefer_avx2_mkl()  # before any Paddle math (utils/cpu.py)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", default="mbf,r18,r50")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps (median); throughput uses half")
    parser.add_argument("--latency-runs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--width", type=float, default=1.0, help="channel width (< 1: Paddle only, no torch)")
    parser.add_argument("--plain", action="store_true", help="also time Paddle's own PReLU kernel (F.prelu)")
    parser.add_argument("--no-torch", action="store_true", help="skip the torch reference")
    parser.add_argument("--exported", action="store_true",
                        help="also time inference of the model exported for Paddle Inference (oneDNN)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time with the process CPU clock (with --threads 1: robust on a machine shared with "
                             "other jobs, where wall time measures the scheduler)")
    parser.add_argument("--micro", action="store_true", help="instead: single-layer timings (PReLU kernels, convs)")
    parser.add_argument("--memory", action="store_true",
                        help="instead: peak memory of one training step without and with --recompute")
    parser.add_argument("--memory-child", metavar="NETWORK", help=argparse.SUPPRESS)  # one --memory measurement
    parser.add_argument("--recompute", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true",
                        help="instead of timing: paddle.profiler operator table of one Paddle training step")
    args = parser.parse_args(argv)

    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # read by Paddle's and torch's runtimes at import
    os.environ.setdefault("GLOG_minloglevel", "2")
    import paddle

    from backbones import NETWORKS

    torch = None
    if not args.no_torch:
        try:
            import torch
            torch.set_num_threads(args.threads)
        except ImportError:
            print("torch not installed: Paddle only", file=sys.stderr)
    networks = [n for n in args.networks.split(",") if n]
    unknown = [n for n in networks if n not in NETWORKS]
    if unknown:
        parser.error(f"unknown network(s) {', '.join(unknown)}")

    if args.micro:
        micro()
        return
    if args.memory_child:
        print(json.dumps(step_memory(args.memory_child, args.batch_size, args.recompute)))
        return
    if args.memory:
        memory_table(networks, args.batch_size, args.threads)
        return
    if args.profile:
        for name in networks:
            profile_step(name, args.batch_size)
        return
    clock = time.process_time if args.cpu_time else time.perf_counter
    rows = []
    header = (f"{'network':<10}{'variant':<17}{'train step s':>13}{'img/s':>8}{'latency b1 ms':>15}"
              f"{'b64 img/s':>11}   speed vs paddle (train / b1 / b64)")
    print(f"# paddle {paddle.__version__}" + (f", torch {torch.__version__}" if torch else "")
          + f", {args.threads} threads, batch {args.batch_size}, width {args.width}, "
          f"medians of {'CPU' if args.cpu_time else 'wall'} time, "
          f"MKL_DEBUG_CPU_TYPE={os.environ.get('MKL_DEBUG_CPU_TYPE', '(unset)')!r}", flush=True)
    print(header, flush=True)
    for name in networks:
        variants = {"paddle": paddle_runner(name, args.batch_size, numpy_prelu=True, width=args.width)}
        if args.plain:
            variants["paddle-F.prelu"] = paddle_runner(name, args.batch_size, numpy_prelu=False, width=args.width)
        if args.exported and args.width == 1.0:
            variants["paddle-inference"] = exported_runner(name, args.threads)
        if torch is not None and args.width == 1.0:
            variants["torch"] = torch_runner(name, args.batch_size)
        result = bench_network(name, variants, args.steps, args.latency_runs, clock)
        base = result["paddle"]
        for variant, r in result.items():
            ratios = " / ".join(f"{base[t] / r[t]:.2f}x" if t in r else "-" for t in ("train", "latency", "throughput"))
            train = f"{r['train']:>13.2f}{args.batch_size / r['train']:>8.1f}" if "train" in r else f"{'-':>13}{'-':>8}"
            print(f"{name:<10}{variant:<17}{train}{r['latency'] * 1e3:>15.1f}{64 / r['throughput']:>11.1f}   {ratios}",
                  flush=True)
            rows.append({"network": name, "variant": variant, "train_step_s": round(r["train"], 4) if "train" in r
                         else None, "latency_b1_ms": round(r["latency"] * 1e3, 2),
                         "throughput_b64_img_s": round(64 / r["throughput"], 2)})
        del variants
    print(json.dumps({"bench": "backbones", "threads": args.threads, "batch_size": args.batch_size, "width": args.width,
                      "clock": "cpu" if args.cpu_time else "wall",
                      "steps": args.steps, "results": rows}))


if __name__ == "__main__":
    main()
