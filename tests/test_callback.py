"""eval.callback.VerificationCallback: best model kept only on improvement, failures never reach training."""

import json
import logging
from pathlib import Path

import cv2
import numpy as np
import paddle
import pytest

from eval.bin_io import write_bin
from eval.callback import VerificationCallback
from tests.launch import launch
from utils.safe_pickle import load_paddle_state

WORKER = Path(__file__).with_name("dist_callback_worker.py")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """val.bin: 20 pairs of flat-colour images, one colour per identity (+ JPEG noise), half genuine."""
    rng = np.random.default_rng(0)
    colours = rng.uniform(20, 235, (20, 3))
    images, issame = [], []
    for i in range(20):
        same = i % 2 == 0
        for colour in (colours[i], colours[i] if same else colours[(i + 7) % 20]):
            img = np.clip(colour + rng.normal(0, 3, (112, 112, 3)), 0, 255).astype(np.uint8)
            images.append(cv2.imencode(".jpg", img)[1].tobytes())
        issame.append(same)
    path = tmp_path_factory.mktemp("data")
    write_bin(path / "val.bin", images, issame)
    return path


def colour_net(good: bool) -> paddle.nn.Layer:
    """Embedding = mean colour (good: separates identities) or a constant (bad: chance accuracy)."""
    net = paddle.nn.Sequential(paddle.nn.AdaptiveAvgPool2D(1), paddle.nn.Flatten(), paddle.nn.Linear(3, 4))
    weight = np.eye(3, 4, dtype=np.float32) if good else np.zeros((3, 4), np.float32)
    net[2].weight.set_value(weight)
    net[2].bias.set_value(np.full(4, 0.0 if good else 0.5, np.float32))
    return net


def test_best_model_is_saved_only_on_improvement(data_dir, tmp_path, caplog):
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        cb = VerificationCallback(data_dir, ["val", "lfw"], batch_size=16, output_dir=out)
    assert "lfw: " in caplog.text and "not found, skipped" in caplog.text
    good, bad = colour_net(True), colour_net(False)
    best = out / "best_val.pdparams"

    first = cb(100, bad)
    assert set(first) == {"val"} and first["val"] <= 0.6 and best.is_file()  # first evaluation is the best so far
    second = cb(200, good)
    assert second["val"] > 0.9
    np.testing.assert_array_equal(load_paddle_state(best)["2.weight"], good[2].weight.numpy())
    stamp = best.stat().st_mtime_ns
    third = cb(300, bad)
    assert third["val"] < second["val"]
    assert best.stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(load_paddle_state(best)["2.weight"], good[2].weight.numpy())
    assert cb.best["val"] == (second["val"], 200)
    assert cb.latest["val"]["step"] == 300 and cb.latest["val"]["best"] == second["val"]
    assert sorted(p.name for p in out.iterdir()) == ["best_val.pdparams"]  # no temp files left
    assert "val.bin (20 pairs, sha " in caplog.text


def test_training_mode_is_restored(data_dir, tmp_path):
    net = colour_net(True)
    net.train()
    VerificationCallback(data_dir, ["val"], 16, tmp_path)(1, net)
    assert net.training


def test_failures_are_logged_and_never_raised(data_dir, tmp_path, caplog):
    class Broken(paddle.nn.Layer):
        def forward(self, x):
            raise RuntimeError("out of memory (simulated)")

    cb = VerificationCallback(data_dir, ["val"], 16, tmp_path / "run")
    with caplog.at_level(logging.ERROR):
        assert cb(5, Broken()) == {}
    assert "step 5: verification on val.bin (20 pairs" in caplog.text and "out of memory" in caplog.text
    assert not (tmp_path / "run").exists() and cb.best == {}

    blocked = tmp_path / "not_a_dir"
    blocked.write_text("")  # saving the best model fails: still no exception
    assert VerificationCallback(data_dir, ["val"], 16, blocked)(6, colour_net(True)) == {}


def test_unreadable_target_fails_at_start(data_dir, tmp_path):
    (tmp_path / "broken.bin").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=r"broken\.bin: not a readable \.bin pickle"):
        VerificationCallback(tmp_path, ["broken"], 16, tmp_path / "run")


def bn_net() -> paddle.nn.Layer:
    """A small conv net with BatchNorm, whose running statistics change the embeddings."""
    return paddle.nn.Sequential(paddle.nn.Conv2D(3, 8, 8, stride=8), paddle.nn.BatchNorm2D(8), paddle.nn.ReLU(),
                                paddle.nn.AdaptiveAvgPool2D(1), paddle.nn.Flatten(), paddle.nn.Linear(8, 8))


@pytest.mark.dist
@pytest.mark.slow
def test_two_ranks_share_the_work_and_equal_one_process(data_dir, tmp_path):
    paddle.seed(5)
    net = bn_net()
    rng = np.random.default_rng(5)
    net[1]._mean.set_value(rng.normal(0, 0.5, 8).astype(np.float32))
    net[1]._variance.set_value(rng.uniform(0.5, 2, 8).astype(np.float32))
    paddle.save(net.state_dict(), str(tmp_path / "net.pdparams"))
    single = VerificationCallback(data_dir, ["val"], 7, tmp_path / "single")
    expected = single(10, net)

    out = tmp_path / "dist"
    proc = launch(WORKER, tmp_path / "net.pdparams", data_dir, out, log_dir=tmp_path / "log", timeout=180)
    assert proc.returncode == 0 and all(f"rank {r}: CALLBACK WORKER OK" in proc.logs for r in (0, 1)), proc.logs
    result = json.loads((out / "result.json").read_text())
    assert result["first"] == expected
    assert result["latest"]["xnorm"] == pytest.approx(single.latest["val"]["xnorm"], rel=1e-6)
    assert sorted(p.name for p in out.iterdir()) == ["best_val.pdparams", "result.json"]
    assert "simulated failure on rank 1" in proc.logs
