"""train.py on 2 CPU ranks for real (paddle.distributed.launch, gloo): training, exact resume, resume on 1 rank.

Two launches in all (a launch costs 5-10 s): a 10-step run that checkpoints at step 5 and 10, and a resume of a
copy of it from step 5. The 2 -> 1 world-size resume runs in this process (no launcher needed for one rank).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import train
from tests.launch import launch
from tests.test_train import losses, tiny_args

pytestmark = [pytest.mark.slow, pytest.mark.dist]


def dist_args(cache_dir: Path, output: Path, run_name: str, *extra: str) -> list[str]:
    """The tiny run of test_train with 8 images per rank: a global batch of 16, 2 steps per epoch."""
    return tiny_args(cache_dir, output, run_name, "--num_epoch", "5", "--stop_at_step", "10", "--save_every", "5",
                     *extra)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    cache = tmp_path_factory.mktemp("cache")
    out = tmp_path_factory.mktemp("dist")
    # with verification on both ranks (each embeds half the pairs) at step 5 and at the end
    proc = launch("train.py", *dist_args(cache, out, "two", "--val_targets", "synth_val", "--val_every", "5"),
                  log_dir=out / "log", nproc=2)
    assert proc.returncode == 0, proc.logs
    return cache, out / "two"


def test_two_ranks_train_and_write_their_shards(two_rank_run: tuple[Path, Path]) -> None:
    _, run = two_rank_run
    loss = losses(run)
    assert sorted(loss) == list(range(1, 11))
    assert np.mean([loss[s] for s in (8, 9, 10)]) < np.mean([loss[s] for s in (1, 2, 3)])
    ckpt = run / "checkpoints" / "step_0000010"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["num_classes"] == 20
    for rank in (0, 1):
        assert np.load(ckpt / f"softmax_weight.r{rank}.npy").shape == (10, 64)
        assert (ckpt / f"rng.r{rank}.json").is_file()
    assert (ckpt / "backbone.pdparams").is_file() and (run / "model.pdparams").is_file()
    log = (run / "train.log").read_text()
    assert "rank 0 of 2" in log and "10 centres on rank 0" in log and "32 samples per epoch" in log
    assert "accuracy after training (step 10): synth_val" in log
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if "val/synth_val" in line] == [5, 10]


def test_exact_resume_on_two_ranks(two_rank_run: tuple[Path, Path], tmp_path: Path) -> None:
    cache, run = two_rank_run
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    (copy / "metrics.jsonl").unlink()
    proc = launch("train.py", *dist_args(cache, tmp_path, "copy", "--resume",
                                         str(copy / "checkpoints" / "step_0000005")),
                  log_dir=tmp_path / "log", nproc=2)
    assert proc.returncode == 0, proc.logs
    expected, got = losses(run), losses(copy)
    assert sorted(got) == list(range(6, 11))
    assert [got[s] for s in range(6, 11)] == pytest.approx([expected[s] for s in range(6, 11)], abs=1e-6)


def test_resume_two_ranks_on_one(two_rank_run: tuple[Path, Path], tmp_path: Path) -> None:
    """The 2-rank checkpoint of step 5 loads on one process: same step, the same full centre matrix, and it trains."""
    cache, run = two_rank_run
    copy = tmp_path / "one"
    shutil.copytree(run, copy)
    saved = copy / "checkpoints" / "step_0000005"
    full = {name: np.concatenate([np.load(saved / f"{name}.r{r}.npy") for r in (0, 1)])
            for name in ("softmax_weight", "softmax_mom")}
    # resume and stop at once: the checkpoint is written again, now by one rank
    assert train.main(dist_args(cache, tmp_path, "one", "--resume", str(saved), "--stop_at_step", "5")) == 0
    manifest = json.loads((saved / "manifest.json").read_text())
    assert manifest["world_size"] == 1
    for name, matrix in full.items():
        assert np.array_equal(np.load(saved / f"{name}.r0.npy"), matrix)
    assert "(saved with 2 ranks: centres re-sharded)" in (copy / "train.log").read_text()
    assert train.main(dist_args(cache, tmp_path, "one", "--resume", "--stop_at_step", "7")) == 0
    assert {6, 7} <= set(losses(copy))
    assert (copy / "checkpoints" / "latest").read_text().strip() == "step_0000007"
