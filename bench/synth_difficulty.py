"""How hard is the built-in synthetic set? Raw-pixel verification, an untrained net, and the same net after a
short training run (the quick start's regime: width-0.25 MobileFaceNet, ArcFace, batch 64, a few thousand images).

    python bench/synth_difficulty.py --identities 100 --images-per-id 16 --val-pairs 600 --steps 100

Prints one JSON line: accuracy on synth_val for raw pixels (cosine), the untrained net, and the net after
every --eval-every steps. The set should be neither trivial (untrained/raw near chance) nor too hard (a
clear rise within ~100 steps). The training is train.py itself (its builders, step, schedule and verification;
--steps is its --stop_at_step), so the figures are those of the quick start.
"""

from __future__ import annotations

import argparse
import contextlib
import json
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


def raw_pixel_accuracy(images: np.ndarray, issame: np.ndarray) -> float:
    """10-fold verification accuracy of cosine similarity between the raw normalised pixels of each pair."""
    from eval.verification import evaluate
    from utils.image import preprocess_batch

    x = preprocess_batch(images).reshape(len(images), -1)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return float(evaluate(x, issame)["accuracy_mean"])


def main() -> None:
    from utils.cpu import prefer_avx2_mkl
    prefer_avx2_mkl()  # before any Paddle math (utils/cpu.py)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--identities", type=int, default=100)
    parser.add_argument("--images-per-id", type=int, default=16)
    parser.add_argument("--val-pairs", type=int, default=600)
    parser.add_argument("--seed", type=int, default=2048)
    parser.add_argument("--cache-dir", default=".cache")
    parser.add_argument("--steps", type=int, default=100, help="training steps of batch --batch-size")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--embedding-size", type=int, default=128)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--raw-only", action="store_true", help="only the raw-pixel baseline (no paddle)")
    args = parser.parse_args()

    from eval.bin_io import load_bin
    from synthetic import VAL_BIN_NAME, ensure_synthetic

    root = ensure_synthetic(args.cache_dir, args.identities, args.images_per_id, args.val_pairs, args.seed)
    val = load_bin(root / VAL_BIN_NAME, progress=False)
    result = {"set": root.name, "val_pairs": val.num_pairs, "raw_pixel_accuracy": raw_pixel_accuracy(val.images,
                                                                                                    val.issame)}
    if args.raw_only:
        print(json.dumps(result))
        return

    start = time.perf_counter()
    curve = train_curve(args)
    result.update(untrained_accuracy=curve[0], accuracy_by_step=curve, images_seen=args.steps * args.batch_size,
                  train_seconds=round(time.perf_counter() - start, 1), gain=curve[args.steps] - curve[0])
    print(json.dumps(result))


def train_curve(args: argparse.Namespace) -> dict[int, float]:
    """synth_val accuracy by step of train.py on the set (before training, every --eval-every steps, at the end)."""
    import train

    with tempfile.TemporaryDirectory(prefix="synth_difficulty_") as out:
        argv = ["--cache_dir", args.cache_dir, "--synthetic_identities", str(args.identities),
                "--synthetic_images_per_id", str(args.images_per_id), "--synthetic_val_pairs", str(args.val_pairs),
                "--seed", str(args.seed), "--batch_size", str(args.batch_size), "--lr", str(args.lr),
                "--embedding_size", str(args.embedding_size), "--stop_at_step", str(args.steps),
                "--val_targets", "synth_val", "--val_at_start", "true", "--val_every", str(args.eval_every),
                "--output", out, "--run_name", "difficulty"]
        with contextlib.redirect_stdout(sys.stderr):  # train.py's log: stdout stays one JSON line
            status = train.main(argv)
        if status != 0:
            raise SystemExit(f"train.py {' '.join(argv)} failed")
        records = map(json.loads, (Path(out) / "difficulty" / "metrics.jsonl").read_text().splitlines())
        return {r["step"]: r["val/synth_val"] for r in records if "val/synth_val" in r}


if __name__ == "__main__":
    main()
