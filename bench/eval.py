"""Evaluation speed: evaluate() against InsightFace's loop protocol, and test() images/s for r50 and mbf on CPU.

    python bench/eval.py                     # both parts
    python bench/eval.py --skip-models       # only evaluate() vs the loops (seconds)

evaluate(): the 6,000 fixture pairs (../shared/fixtures/verification_synth_seed0.npz, or as many random unit pairs
if absent), median of --repeats runs, next to tests/insightface_reference.py (InsightFace's loops: accuracy over
400 thresholds, VAL over 4,000) in the same process; the numbers must be identical. test(): the flip test of
full-width backbones (random weights: speed does not depend on them) on a .bin of synthetic faces.
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT.parent / "shared" / "fixtures" / "verification_synth_seed0.npz"


def pairs(n_pairs: int = 6000) -> tuple[np.ndarray, np.ndarray, str]:
    if FIXTURE.is_file():
        data = np.load(FIXTURE)
        return data["embeddings"], data["issame"], FIXTURE.name
    rng = np.random.default_rng(0)
    issame = rng.uniform(size=n_pairs) < 0.5
    a = rng.normal(size=(n_pairs, 64))
    b = a + rng.normal(size=a.shape) * np.where(issame, 1.0, 3.0)[:, None]
    emb = np.stack([a, b], 1).reshape(-1, 64).astype(np.float32)
    return emb / np.linalg.norm(emb, axis=1, keepdims=True), issame, "random unit pairs"


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def bench_evaluate(repeats: int) -> dict:
    """Interleaved runs (the machine is shared: both sides see the same load); medians."""
    from eval.verification import evaluate
    from tests.insightface_reference import calculate_roc, calculate_val

    emb, issame, source = pairs()
    fast, loop_roc, loop_val = [], [], []
    for i in range(repeats):
        seconds, result = timed(lambda: evaluate(emb, issame))
        fast.append(seconds)
        if i % 5 == 0:
            seconds, (_, _, accuracy, best) = timed(lambda: calculate_roc(emb, issame))
            loop_roc.append(seconds)
        if i % 10 == 0:
            seconds, (val, far, _) = timed(lambda: calculate_val(emb, issame))
            loop_val.append(seconds)
    t_fast, t_roc, t_val = (statistics.median(t) for t in (fast, loop_roc, loop_val))
    identical = (np.array_equal(result["accuracy"], accuracy) and np.array_equal(result["best_thresholds"], best)
                 and result["val"] == np.mean(val) and result["far"] == np.mean(far))
    return {"source": source, "pairs": len(issame), "evaluate_s": t_fast, "loop_accuracy_s": t_roc,
            "loop_accuracy_val_s": t_roc + t_val, "speedup_vs_accuracy_loop": t_roc / t_fast,
            "speedup_vs_full_loop": (t_roc + t_val) / t_fast, "identical": bool(identical),
            "accuracy_mean": result["accuracy_mean"], "val": result["val"]}


def synthetic_bin(directory: Path, n_pairs: int) -> Path:
    import cv2

    from eval.bin_io import write_bin
    from utils.faces import render_face, sample_identity

    rng = np.random.default_rng(0)
    people = [sample_identity(rng) for _ in range(max(2, n_pairs // 4))]
    images, issame = [], []
    for i in range(n_pairs):
        a = people[i % len(people)]
        b = a if i % 2 == 0 else people[(i + 1) % len(people)]
        for person in (a, b):
            img = render_face(person, rng)[0]
            images.append(cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))[1].tobytes())
        issame.append(i % 2 == 0)
    path = directory / "bench_val.bin"
    write_bin(path, images, issame)
    return path


def bench_models(networks: list[str], n_pairs: int, batch_size: int) -> list[dict]:
    import paddle

    import backbones
    from eval.bin_io import load_bin
    from eval.verification import test

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        binset = load_bin(synthetic_bin(Path(tmp), n_pairs), progress=False)
        for name in networks:
            paddle.seed(0)
            model = backbones.get_model(name)
            with paddle.no_grad():  # warm-up: first calls allocate and pick kernels
                model.eval()
                model(paddle.zeros([batch_size, 3, 112, 112]))
            result = test(binset, model, batch_size=batch_size, progress=False)
            images = len(binset.images)
            rows.append({"network": name, "images": images, "batch_size": batch_size, "seconds": result["seconds"],
                         "images_per_s": images / result["seconds"],
                         "forward_images_per_s": 2 * images / result["seconds"]})
    return rows


def main(argv: list[str] | None = None) -> int:
    from utils.cpu import prefer_avx2_mkl
    prefer_avx2_mkl()  # before any Paddle math (utils/cpu.py)
    parser = argparse.ArgumentParser(description="Speed of evaluate() (vs InsightFace's loops) and of test().")
    parser.add_argument("--repeats", type=int, default=20, help="runs of evaluate() (median reported)")
    parser.add_argument("--networks", nargs="+", default=["mbf", "r50"])
    parser.add_argument("--pairs", type=int, default=200, help="pairs of the .bin timed with test()")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--skip-models", action="store_true", help="only time evaluate()")
    args = parser.parse_args(argv)
    os.environ.setdefault("GLOG_minloglevel", "2")

    report = {"evaluate": bench_evaluate(args.repeats), "threads": os.environ.get("OMP_NUM_THREADS", "1"),
              "cpus": os.cpu_count()}
    e = report["evaluate"]
    print(f"evaluate() on {e['pairs']} pairs ({e['source']}): {1000 * e['evaluate_s']:.1f} ms (median of "
          f"{args.repeats}); loop accuracy {1000 * e['loop_accuracy_s']:.0f} ms "
          f"-> {e['speedup_vs_accuracy_loop']:.0f}x; loop accuracy + VAL {1000 * e['loop_accuracy_val_s']:.0f} ms "
          f"-> {e['speedup_vs_full_loop']:.0f}x; "
          f"identical numbers: {e['identical']}")
    if not args.skip_models:
        report["test"] = bench_models(args.networks, args.pairs, args.batch_size)
        print(f"{'network':8} {'images':>6} {'batch':>5} {'seconds':>8} {'images/s':>9} {'forwards/s':>10}")
        for r in report["test"]:
            print(f"{r['network']:8} {r['images']:6d} {r['batch_size']:5d} {r['seconds']:8.1f} "
                  f"{r['images_per_s']:9.1f} {r['forward_images_per_s']:10.1f}")
    print(json.dumps(report))
    return 0 if e["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
