"""Training step time of the backbone modes side by side: dygraph NCHW, --to_static, --data_format NHWC (and both).

    python bench/train_modes.py                          # mbf and r18, width 1.0, batch 32, 2 threads
    python bench/train_modes.py --networks mbf --width 0.25 --rounds 5

A step is train.py's own (engine.step.TrainStep) on a random uint8 batch: input normalisation, backbone forward,
Partial FC head, backward, both optimizer updates. The modes run in rounds (each mode `--steps` timed steps per
round, after one untimed warm-up step that also compiles the to_static graph), so load from other jobs hits every
mode alike. Prints one JSON line
per network: median step seconds per mode and each mode's time relative to dygraph NCHW. oneDNN stays off (see
train.py: it trains a to_static graph wrongly on CPU).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
if __name__ == "__main__":  # a program: quiet Paddle before it is imported (importing this module sets nothing)
    from utils.cli import start_program

    start_program()
    warnings.filterwarnings("ignore", message="Tensor do not have 'place'")  # to_static's backward builder

import numpy as np
import paddle

from config import load_config
from engine.step import TrainStep, build_backbone, build_head, build_optimizer
from utils.lr_scheduler import PolynomialLRWarmup

MODES = {"dygraph_nchw": ("NCHW", False), "to_static_nchw": ("NCHW", True), "dygraph_nhwc": ("NHWC", False),
         "to_static_nhwc": ("NHWC", True)}


class Stepper:
    """One mode's backbone, head, optimizer and schedule, stepped on a fixed random batch."""

    def __init__(self, args: argparse.Namespace, network: str, data_format: str, compiled: bool):
        cfg = load_config("synthetic", {"network": network, "width": args.width, "embedding_size": 512,
                                        "batch_size": args.batch, "data_format": data_format})
        paddle.seed(0)
        backbone = build_backbone(cfg)
        model = paddle.jit.to_static(backbone, full_graph=True) if compiled else backbone
        scheduler = PolynomialLRWarmup(cfg.lr, 0, 10_000)
        self.trainer = TrainStep(model, build_head(cfg, args.classes),
                                 build_optimizer(cfg, backbone.parameters(), scheduler), scheduler)
        rng = np.random.default_rng(0)
        images = paddle.to_tensor(rng.integers(0, 256, (args.batch, 112, 112, 3), dtype=np.uint8))
        self.batches = itertools.repeat((images, paddle.to_tensor(rng.integers(0, args.classes, args.batch))))
        model.train()

    def step(self) -> float:
        start = time.perf_counter()
        self.trainer(self.batches)
        return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--networks", default="mbf,r18", help="comma-separated backbones")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per mode per round")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    modes = args.modes.split(",")
    if unknown := [m for m in modes if m not in MODES]:
        parser.error(f"--modes: unknown {', '.join(unknown)}")
    paddle.base.core.set_num_threads(args.threads)
    for network in args.networks.split(","):
        steppers = {}
        compile_s = {}
        for mode in modes:
            steppers[mode] = Stepper(args, network, *MODES[mode])
            compile_s[mode] = round(steppers[mode].step(), 2)  # warm-up; the to_static compile happens here
        times: dict[str, list[float]] = {mode: [] for mode in modes}
        for _ in range(args.rounds):
            for mode in modes:
                times[mode] += [steppers[mode].step() for _ in range(args.steps)]
        median = {mode: statistics.median(t) for mode, t in times.items()}
        base = median.get("dygraph_nchw")
        print(json.dumps({"network": network, "width": args.width, "batch": args.batch, "threads": args.threads,
                          "rounds": args.rounds, "steps_per_round": args.steps,
                          "median_step_s": {m: round(v, 3) for m, v in median.items()},
                          "vs_dygraph_nchw": {m: round(v / base, 3) for m, v in median.items()} if base else None,
                          "first_step_s": compile_s,
                          "load_average": [round(x, 2) for x in os.getloadavg()]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
