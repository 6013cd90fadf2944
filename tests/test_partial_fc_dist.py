"""Partial FC on 2 real CPU ranks (paddle.distributed.launch, gloo): exactness of both backends, paddle backend ==
numpy backend in every case, no host reads, sampling, re-sharding across backends and world sizes, rank failure."""

import time
from pathlib import Path

import numpy as np
import paddle
import pytest

from losses import CombinedMarginLoss
from partial_fc import PartialFC
from tests.launch import launch

WORKER = Path(__file__).with_name("dist_pfc_worker.py")
C, D, B = 37, 8, 5  # as in the worker

pytestmark = [pytest.mark.dist, pytest.mark.slow]


def test_two_ranks_equal_one_process_and_reshard(tmp_path: Path) -> None:
    margin = CombinedMarginLoss(64.0, 1.0, 0.5, 0.0)
    single = PartialFC(margin, D, C, sample_rate=0.5, seed=3)
    rng = np.random.default_rng(1)
    single(paddle.to_tensor(rng.standard_normal((4, D)).astype(np.float32), stop_gradient=False),
           paddle.to_tensor(rng.choice(C, 4))).backward()
    single.step(0.1)  # non-trivial weight and momentum
    single.save(tmp_path / "w1")

    proc = launch(WORKER, "check", tmp_path / "w1", tmp_path / "w2", log_dir=tmp_path / "log", timeout=180)
    assert proc.returncode == 0 and all(f"rank {r}: PFC WORKER OK" in proc.logs for r in (0, 1)), proc.logs

    manifest = (tmp_path / "w2" / "manifest.json").read_text()
    assert '"world_size": 2' in manifest
    resharded = PartialFC(margin, D, C, sample_rate=0.5)
    resharded.load(tmp_path / "w2")  # W=2 -> W=1
    for name, array in [("weight", resharded.weight), ("mom", resharded.opt_state["momentum"])]:
        shards = [np.load(tmp_path / "w2" / f"softmax_{name}.r{r}.npy") for r in (0, 1)]
        assert [s.shape[0] for s in shards] == [19, 18]
        np.testing.assert_array_equal(array, np.concatenate(shards))


def test_a_dying_rank_stops_the_other(tmp_path: Path) -> None:
    start = time.monotonic()
    proc = launch(WORKER, "die", log_dir=tmp_path / "log", timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0, proc.logs
    assert elapsed < 60, f"took {elapsed:.0f} s\n{proc.logs}"
