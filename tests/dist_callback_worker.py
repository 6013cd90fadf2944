"""Worker for tests/test_callback.py, run on 2 CPU ranks by tests/launch.py (paddle.distributed.launch, gloo).

`WEIGHTS DATA_DIR OUT_DIR`: both ranks load the same weights, rank 1 then scrambles its BatchNorm statistics;
the callback must broadcast rank 0's, split the images between the ranks and give both the same accuracies.
Then rank 1 alone fails inside its forward: both ranks return {} and the next call still works (no hang, no
mismatched collectives). Rank 0 writes OUT_DIR/result.json.
"""

import json
import sys
from pathlib import Path

import numpy as np
import paddle
import paddle.distributed as dist

from eval.callback import VerificationCallback
from tests.test_callback import bn_net
from utils.safe_pickle import load_paddle_state


class FailsOnRank1(paddle.nn.Layer):
    def __init__(self, net: paddle.nn.Layer, rank: int):
        super().__init__()
        self.net, self.rank = net, rank

    def forward(self, x):
        if self.rank == 1:
            raise RuntimeError("simulated failure on rank 1")
        return self.net(x)


def main() -> None:
    weights, data_dir, out_dir = map(Path, sys.argv[1:4])
    dist.init_parallel_env()
    rank, world = dist.get_rank(), dist.get_world_size()
    net = bn_net()
    net.set_state_dict(load_paddle_state(weights))
    if rank == 1:
        net[1]._mean.set_value(np.full(8, 5.0, np.float32))
        net[1]._variance.set_value(np.full(8, 0.01, np.float32))
    cb = VerificationCallback(data_dir, ["val"], 7, out_dir, rank=rank, world_size=world)
    first = cb(10, net)
    np.testing.assert_array_equal(net[1]._mean.numpy(), load_paddle_state(weights)["1._mean"])
    failed = cb(20, FailsOnRank1(net, rank))
    again = cb(30, net)
    assert set(first) == {"val"} and failed == {} and again == first, (first, failed, again)
    if rank == 0:
        (out_dir / "result.json").write_text(json.dumps({"first": first, "latest": cb.latest["val"]}))
    print(f"rank {rank}: CALLBACK WORKER OK {first}", flush=True)


if __name__ == "__main__":
    main()
