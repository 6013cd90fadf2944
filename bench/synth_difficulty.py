"""How hard is the built-in synthetic set? Raw-pixel verification, an untrained net, and the same net after a
short training run (the quick start's regime: width-0.25 MobileFaceNet, ArcFace, batch 64, a few thousand images).

    python bench/synth_difficulty.py --identities 100 --images-per-id 16 --val-pairs 600 --steps 100

Prints one JSON line: accuracy on synth_val for raw pixels (cosine), the untrained net, and the net after
every --eval-every steps. The set should be neither trivial (untrained/raw near chance) nor too hard (a
clear rise within ~100 steps).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ.setdefault("GLOG_minloglevel", "2")

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

    import paddle

    from backbones import get_model
    from dataset import RecordIODataset, to_model_input
    from eval.verification import test
    from losses import CombinedMarginLoss
    from partial_fc import PartialFC

    paddle.seed(args.seed)
    train = RecordIODataset(root, train=True, seed=args.seed)
    model = get_model("mbf", num_features=args.embedding_size, width=0.25)
    pfc = PartialFC(CombinedMarginLoss(64.0, 1.0, 0.5, 0.0), args.embedding_size, train.num_classes)
    opt = paddle.optimizer.Momentum(args.lr, momentum=0.9, parameters=model.parameters(), weight_decay=5e-4,
                                    grad_clip=paddle.nn.ClipGradByGlobalNorm(5.0))
    curve = {0: test(val, model, progress=False)["accuracy_mean"]}
    rng = np.random.default_rng(args.seed)
    order = np.concatenate([rng.permutation(len(train)) for _ in range(args.steps * args.batch_size // len(train) + 1)])
    start = time.perf_counter()
    for step in range(args.steps):
        batch = order[step * args.batch_size:(step + 1) * args.batch_size]
        epoch = step * args.batch_size // len(train)
        images, labels = np.empty((len(batch), 112, 112, 3), np.uint8), np.empty(len(batch), np.int64)
        train.load_batch(batch, epoch, images, labels)
        loss = pfc(model(to_model_input(paddle.to_tensor(images))), paddle.to_tensor(labels))
        loss.backward()
        opt.step()
        opt.clear_grad()
        pfc.step(args.lr)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            curve[step + 1] = test(val, model, progress=False)["accuracy_mean"]
            print(f"step {step + 1} loss {float(loss):.3f} synth_val {curve[step + 1]:.4f}", file=sys.stderr)
    result.update(untrained_accuracy=curve[0], accuracy_by_step=curve, images_seen=args.steps * args.batch_size,
                  train_seconds=round(time.perf_counter() - start, 1), gain=curve[args.steps] - curve[0])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
