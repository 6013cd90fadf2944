"""One rank of tests/test_vit.py's 2-rank recompute check (run by paddle.distributed.launch).

Per network: the same model without recompute (DataParallel's own gradient sync) and with it (train.py's way:
forward under `deferred_sync`, then `all_reduce_gradients`), one backward on this rank's own batch with the same
RNG draws (masking, drop path). Prints one JSON line: the worst gradient difference between the two (relative to
each tensor's largest), and a checksum of the gradients, the same on both ranks once they are averaged.
"""

from __future__ import annotations

import json

import numpy as np
import paddle
import paddle.distributed as dist

from backbones import get_model
from backbones.recompute import all_reduce_gradients, deferred_sync


def rank_gradients(name: str, width: float, recompute: bool, rank: int) -> dict[str, np.ndarray]:
    paddle.seed(0)
    model = get_model(name, width=width, num_features=32, recompute=recompute)
    parallel = paddle.DataParallel(model)
    x = paddle.to_tensor(np.random.default_rng(rank).normal(size=(2, 3, 112, 112)).astype(np.float32))
    paddle.seed(100 + rank)
    with deferred_sync(parallel):
        out = parallel(x)
    (out * paddle.linspace(-1.0, 1.0, out.shape[1])).square().sum().backward()
    all_reduce_gradients(parallel)
    return {k: p.grad.numpy() for k, p in model.named_parameters() if p.grad is not None}


def main() -> None:
    dist.init_parallel_env()
    rank = dist.get_rank()
    result = {"rank": rank}
    for name, width in (("vit_t", 0.25), ("r18", 0.125)):
        plain, recomputed = (rank_gradients(name, width, flag, rank) for flag in (False, True))
        assert plain.keys() == recomputed.keys()
        result[name] = {
            "worst": max(float(np.abs(recomputed[k] - v).max() / np.abs(v).max()) for k, v in plain.items()),
            "checksum": float(sum(np.abs(v).sum() for v in recomputed.values())),
        }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
