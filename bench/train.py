"""Training throughput: end-to-end train.py on the synthetic rec vs the model-only step rate on random tensors.

    python bench/train.py                       # mbf and r18 at batch 32, 2 threads
    python bench/train.py --networks mbf --steps 6 --repeats 3

End-to-end = train.py itself (DataLoader workers decoding the rec, logging every step, metrics.jsonl), timed from
the wall-clock stamps of its metrics records after a warm-up. Model-only = the same builders and training step
(engine.step.TrainStep: input normalisation, forward, head, backward, both updates, LR schedule) on one random uint8
batch in this process. The difference is what the data pipeline and
logging cost. Measurements alternate (e2e, model, e2e, model, ...) so that load from other jobs hits both alike;
medians are printed as one JSON line per network.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
if __name__ == "__main__":  # a program: quiet Paddle before it is imported (importing this module sets nothing)
    from utils.cli import start_program

    start_program()

import numpy as np
import paddle

import train
from config import load_config
from engine.step import Schedule, TrainStep, build_backbone, build_head, build_optimizer


def end_to_end(args: argparse.Namespace, network: str, out: Path, run: str) -> float:
    """Samples/s of train.py between the end of warm-up step W and step W + N (wall clock, everything included)."""
    total = args.warmup + args.steps
    argv = ["--network", network, "--width", str(args.width), "--embedding_size", "512", "--batch_size",
            str(args.batch), "--threads", str(args.threads), "--num_workers", str(args.workers), "--log_every", "1",
            "--val_targets", "", "--val_at_start", "false", "--cache_dir", args.cache_dir, "--synthetic_identities",
            str(args.identities), "--synthetic_images_per_id", str(args.images_per_id), "--stop_at_step", str(total),
            "--output", str(out), "--run_name", run]
    if train.main(argv) != 0:
        raise SystemExit(f"train.py {' '.join(argv)} failed")
    stamps = {r["step"]: r["time"] for r in map(json.loads, (out / run / "metrics.jsonl").read_text().splitlines())
              if "time" in r}
    return args.steps * args.batch / (stamps[total] - stamps[args.warmup])


def model_only(args: argparse.Namespace, network: str, num_classes: int) -> float:
    """Samples/s of train.py's training step alone (engine.step.TrainStep) on one random uint8 batch."""
    cfg = load_config("synthetic", {"network": network, "width": args.width, "embedding_size": 512,
                                    "batch_size": args.batch, "num_classes": num_classes})
    backbone = build_backbone(cfg)
    scheduler = Schedule.of(cfg, args.identities * args.images_per_id // args.batch).scheduler(cfg)  # train.py's
    trainer = TrainStep(backbone, build_head(cfg, num_classes), build_optimizer(cfg, backbone.parameters(), scheduler),
                        scheduler)
    rng = np.random.default_rng(0)
    images = paddle.to_tensor(rng.integers(0, 256, (args.batch, 112, 112, 3), dtype=np.uint8))
    batches = itertools.repeat((images, paddle.to_tensor(rng.integers(0, num_classes, args.batch))))
    backbone.train()
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            start = time.perf_counter()
        trainer(batches)
    return args.steps * args.batch / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    from utils.cpu import prefer_avx2_mkl
    prefer_avx2_mkl()  # before any Paddle math (utils/cpu.py)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--networks", default="mbf,r18", help="comma-separated backbones")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the end-to-end run")
    parser.add_argument("--identities", type=int, default=200)
    parser.add_argument("--images-per-id", type=int, default=20)
    parser.add_argument("--cache-dir", default=".cache")
    args = parser.parse_args(argv)
    paddle.base.core.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        for network in args.networks.split(","):
            e2e, model = [], []
            for r in range(args.repeats):
                e2e.append(end_to_end(args, network, Path(tmp), f"{network}_{r}"))
                paddle.base.core.set_num_threads(args.threads)
                model.append(model_only(args, network, args.identities))
            e2e_med, model_med = statistics.median(e2e), statistics.median(model)
            print(json.dumps({"network": network, "width": args.width, "batch": args.batch, "threads": args.threads,
                              "workers": args.workers, "steps": args.steps, "repeats": args.repeats,
                              "end_to_end_samples_per_s": round(e2e_med, 2),
                              "model_only_samples_per_s": round(model_med, 2),
                              "pipeline_and_logging_cost": round(1 - e2e_med / model_med, 4),
                              "e2e_runs": [round(x, 2) for x in e2e], "model_runs": [round(x, 2) for x in model]}),
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
