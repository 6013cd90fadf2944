"""model_test.py: the accuracy table of converted arcface_torch weights equals the torch model's own; bad inputs."""

from __future__ import annotations

import pickle
from pathlib import Path

import cv2
import numpy as np
import paddle
import pytest

from backbones import get_model
from eval.bin_io import write_bin
from eval.verification import evaluate
from paddle_pretrainedmodel.model_test import main as model_test

PAIRS = 10  # the fewest a 10-fold evaluation accepts: full-width mbf embeds 4 views of each on CI


def make_pairs(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """2N RGB crops: 'same' pairs are one smooth random image and a noisy copy, 'different' pairs two images."""
    rng = np.random.default_rng(seed)
    base = [cv2.resize(rng.integers(0, 256, (14, 14, 3), dtype=np.uint8), (112, 112)) for _ in range(2 * PAIRS)]
    issame = np.arange(PAIRS) % 2 == 0
    images = []
    for i, same in enumerate(issame):
        first = base[2 * i]
        second = first if same else base[2 * i + 1]
        noise = rng.integers(-20, 21, second.shape)
        images += [first, np.clip(second.astype(int) + noise, 0, 255).astype(np.uint8)]
    return np.stack(images), issame


def write_set(path: Path, images: np.ndarray, issame: np.ndarray) -> None:
    # PNG, lossless: the decoded pixels equal `images`, so a reference can use the arrays directly
    write_bin(path, [cv2.imencode(".png", img[:, :, ::-1])[1].tobytes() for img in images], issame)


def run(capsys: pytest.CaptureFixture, *args: str | Path) -> tuple[int, str, str]:
    try:
        code = model_test([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def tiny_weights(tmp_path: Path) -> Path:
    paddle.seed(0)
    path = tmp_path / "tiny" / "model.pdparams"
    path.parent.mkdir()
    paddle.save(get_model("mbf", width=0.25, num_features=64).state_dict(), str(path))
    return path


def test_converted_torch_weights_give_torch_accuracy(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    torch = pytest.importorskip("torch")
    from paddle_pretrainedmodel.convert_torch import convert_state_dict
    from tests.torch_reference import get_torch_model, randomize

    reference = randomize(get_torch_model("mbf"), seed=5)
    weights = tmp_path / "mbf.pdparams"
    paddle.save(convert_state_dict(reference.state_dict(), "mbf"), str(weights))
    images, issame = make_pairs()
    write_set(tmp_path / "lfw.bin", images, issame)
    code, out, err = run(capsys, "--network", "mbf", "--weights", weights, "--data", tmp_path, "--batch-size", "16")
    assert code == 0, err

    # reference: torch embeddings of image + mirror, summed, L2-normalised, InsightFace's 10-fold evaluation
    x = (images.astype(np.float32) / 255 - 0.5) / 0.5
    with torch.no_grad():
        views = [reference(torch.from_numpy(np.ascontiguousarray(v.transpose(0, 3, 1, 2)))).double().numpy()
                 for v in (x, x[:, :, ::-1])]
    summed = views[0] + views[1]
    expected = evaluate(summed / np.linalg.norm(summed, axis=1, keepdims=True), issame)
    row = next(line for line in out.splitlines() if line.startswith("lfw"))
    assert f"{expected['accuracy_mean']:.5f}+-{expected['accuracy_std']:.5f}" in row
    assert f"{PAIRS:>7}" in row
    assert expected["accuracy_mean"] > 0.7  # pairs line up: a random net still separates noisy copies
    for target in ("cfp_fp", "agedb_30", "calfw", "cplfw"):
        assert f"{target}.bin not found" in err
    results = (tmp_path / "results.txt").read_text()
    assert row in results and "network mbf" in results and "flip True" in results


def test_no_flip_and_existing_results(tiny_weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    images, issame = make_pairs(1)
    write_set(tmp_path / "synth_val.bin", images, issame)
    args = ["--network", "mbf", "--width", "0.25", "--embedding-size", "64", "--weights", tiny_weights,
            "--data", tmp_path, "--targets", "synth_val", "--no-flip"]
    code, out, err = run(capsys, *args)
    assert code == 0, err
    model = get_model("mbf", width=0.25, num_features=64)
    model.set_state_dict(paddle.load(str(tiny_weights)))
    model.eval()
    with paddle.no_grad():  # one view only: the mirror must not be added
        single = model(paddle.to_tensor((images.transpose(0, 3, 1, 2) / 127.5 - 1).astype(np.float32))).numpy()
    expected = evaluate(single / np.linalg.norm(single, axis=1, keepdims=True), issame)
    assert f"{expected['accuracy_mean']:.5f}+-{expected['accuracy_std']:.5f}" in out
    results = tiny_weights.with_name("results.txt")
    assert "flip False" in results.read_text()
    code, _, err = run(capsys, *args)
    assert code == 1 and "exists (use --force" in err
    assert run(capsys, *args, "--force")[0] == 0


def test_no_target_found(tiny_weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "other.bin").write_bytes(b"")
    code, _, err = run(capsys, "--network", "mbf", "--weights", tiny_weights, "--data", tmp_path)
    assert code == 1 and "none of lfw, cfp_fp, agedb_30, calfw, cplfw found" in err and "other.bin" in err
    assert not tiny_weights.with_name("results.txt").exists()


def test_weights_of_another_network_list_keys(tiny_weights: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    write_set(tmp_path / "lfw.bin", *make_pairs())
    code, _, err = run(capsys, "--network", "r18", "--width", "0.25", "--weights", tiny_weights, "--data", tmp_path)
    assert code == 1 and "not a r18" in err and "missing: bn1._mean" in err and "unexpected: conv_sep" in err
    code, _, err = run(capsys, "--network", "mbf", "--width", "0.25", "--weights", tiny_weights, "--data", tmp_path)
    assert code == 1 and "wrong shape" in err  # embedding size 512 by default, the weights have 64


class _RunsCode:
    def __reduce__(self):
        return (exec, ("raise SystemExit('pickle code ran')",))


def test_code_running_weights_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_set(tmp_path / "lfw.bin", *make_pairs())
    (tmp_path / "evil.pdparams").write_bytes(pickle.dumps({"conv1.weight": _RunsCode()}))
    code, _, err = run(capsys, "--network", "mbf", "--weights", tmp_path / "evil.pdparams", "--data", tmp_path)
    assert code == 1 and "refusing to load global builtins.exec" in err


def test_read_only_weights_folder_points_to_output(tiny_weights: Path, tmp_path: Path, monkeypatch,
                                                   capsys: pytest.CaptureFixture) -> None:
    import paddle_pretrainedmodel.model_test as tool

    def read_only(path, **kwargs):  # what a weights folder on a read-only mount gives (root writes anywhere else)
        raise PermissionError(f"{path}: cannot be written ({path.parent}: Read-only file system)")

    monkeypatch.setattr(tool, "check_writable", read_only)
    write_set(tmp_path / "lfw.bin", *make_pairs())
    code, _, err = run(capsys, "--network", "mbf", "--weights", tiny_weights, "--data", tmp_path)
    assert code == 1 and err == (f"error: {tiny_weights.with_name('results.txt')}: cannot be written "
                                 f"({tiny_weights.parent}: Read-only file system); choose another results file "
                                 "with --output\n")
