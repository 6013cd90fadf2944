"""eval.verification: InsightFace's numbers exactly (fixture + loop reference), VAL@FAR, flip test, bad input."""

import json
import logging

import cv2
import numpy as np
import paddle
import pytest

from eval.bin_io import load_bin, write_bin
from eval.verification import evaluate
from eval.verification import test as verify  # not "test": pytest would collect it
from tests.insightface_reference import calculate_roc, calculate_val
from utils.image import preprocess


@pytest.fixture(scope="module")
def fixture_pairs(shared_fixtures):
    data = np.load(shared_fixtures / "verification_synth_seed0.npz")
    expected = json.loads((shared_fixtures / "verification_synth_seed0.expected.json").read_text())
    return data["embeddings"], data["issame"], expected


def test_fixture_fold_accuracies_are_insightfaces(fixture_pairs):
    embeddings, issame, expected = fixture_pairs
    result = evaluate(embeddings, issame)
    assert np.max(np.abs(result["accuracy"] - np.array(expected["accuracy_per_fold"]))) <= 1e-12
    assert abs(result["accuracy_mean"] - expected["accuracy_mean"]) <= 1e-12
    assert abs(result["accuracy_std"] - expected["accuracy_std"]) <= 1e-12
    assert abs(result["tpr"].mean() - expected["tpr_mean"]) <= 1e-12
    assert abs(result["fpr"].mean() - expected["fpr_mean"]) <= 1e-12


def test_fixture_val_at_far_equals_loop_reference(fixture_pairs):
    """The inputs on which InsightFace's interp1d crashed: every fold's threshold, VAL and FAR equal the loop's."""
    embeddings, issame, _ = fixture_pairs
    result = evaluate(embeddings, issame)
    val, far, thresholds = calculate_val(embeddings, issame)
    np.testing.assert_array_equal(result["val_thresholds"], thresholds)
    assert result["val"] == np.mean(val) and result["val_std"] == np.std(val) and result["far"] == np.mean(far)
    assert 0 < result["val"] < 1 and result["far"] <= 1.5e-3


def _tied_pairs(n_pairs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit embeddings whose distances often sit exactly on a threshold (0 and 2): probes `dist < t` (strict)."""
    rng = np.random.default_rng(seed)
    issame = rng.uniform(size=n_pairs) < 0.5
    a = rng.normal(size=(n_pairs, 8))
    b = a + rng.normal(size=(n_pairs, 8)) * np.where(issame, 0.6, 1.5)[:, None]
    a[::7], b[::7] = np.eye(8)[0], np.eye(8)[0]      # distance exactly 0
    a[3::11], b[3::11] = np.eye(8)[0], np.eye(8)[1]  # distance exactly 2
    emb = np.empty((2 * n_pairs, 8))
    emb[0::2], emb[1::2] = a, b
    return emb / np.linalg.norm(emb, axis=1, keepdims=True), issame


@pytest.mark.parametrize(("n_pairs", "folds", "far_target", "dtype"),
                         [(603, 10, 1e-2, np.float64), (250, 5, 1e-1, np.float32)])
def test_equals_loop_reference_with_ties_and_uneven_folds(n_pairs, folds, far_target, dtype):
    """float32 inputs: distances in float32, compared with float64 thresholds, as NumPy 2 runs InsightFace's code."""
    emb, issame = _tied_pairs(n_pairs, seed=n_pairs)
    emb = emb.astype(dtype)
    result = evaluate(emb, issame, nrof_folds=folds, far_target=far_target)
    tpr, fpr, accuracy, best = calculate_roc(emb, issame, folds)
    np.testing.assert_array_equal(result["accuracy"], accuracy)
    np.testing.assert_array_equal(result["best_thresholds"], best)
    np.testing.assert_array_equal(result["tpr"], tpr)
    np.testing.assert_array_equal(result["fpr"], fpr)
    val, far, thresholds = calculate_val(emb, issame, far_target, folds)
    np.testing.assert_array_equal(result["val_thresholds"], thresholds)
    assert (result["val"], result["val_std"], result["far"]) == (np.mean(val), np.std(val), np.mean(far))


@pytest.mark.parametrize(("embeddings", "issame", "message"), [
    (np.eye(3)[:3], [True], "odd number of rows"),
    (np.tile(np.eye(2), (2, 1)), [True], "1 labels for 2 pairs"),
    (np.tile(np.eye(2), (2, 1)), [True, False, True], "3 labels for 2 pairs"),
    (np.array([[1.0, 0.0], [np.nan, 0.0], [0.0, 1.0], [1.0, 0.0]]), [True, False], "NaN/Inf in 1 rows"),
    (np.array([[2.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]), [True, False], "row 0 has norm 2"),
    (np.ones(4), [True, False], "2-D"),
])
def test_bad_input_is_a_clear_error(embeddings, issame, message):
    with pytest.raises(ValueError, match=message):
        evaluate(np.asarray(embeddings), np.asarray(issame), nrof_folds=2)


def test_more_folds_than_pairs_is_an_error():
    with pytest.raises(ValueError, match="nrof_folds must be in"):
        evaluate(np.tile(np.eye(2), (2, 1)), np.array([True, False]), nrof_folds=10)


# ---- test(): flip test through a real backbone, independent of the batch size ----

@pytest.fixture(scope="module")
def small_bin(tmp_path_factory):
    """12 pairs of 112x112 JPEGs written with eval.bin_io: faces of 6 synthetic identities."""
    from utils.faces import render_face, sample_identity

    rng = np.random.default_rng(0)
    people = [sample_identity(rng) for _ in range(6)]
    images, issame = [], []
    for i in range(12):
        same = i % 2 == 0
        a, b = people[i % 6], people[i % 6] if same else people[(i + 1) % 6]
        images += [render_face(a, rng)[0], render_face(b, rng)[0]]
        issame.append(same)
    encoded = [cv2.imencode(".jpg", cv2.cvtColor(im, cv2.COLOR_RGB2BGR))[1].tobytes() for im in images]
    path = tmp_path_factory.mktemp("bins") / "tiny_val.bin"
    write_bin(path, encoded, np.array(issame))
    return load_bin(path)


@pytest.fixture(scope="module")
def tiny_model():
    import backbones

    paddle.seed(0)
    model = backbones.get_model("mbf", width=0.25, num_features=32)
    model.train()
    return model


def test_flip_test_is_batch_size_independent_and_matches_per_image_reference(small_bin, tiny_model, caplog):
    with caplog.at_level(logging.INFO):
        whole = verify(small_bin, tiny_model, batch_size=len(small_bin.images), progress=False)
    tail = verify(small_bin, tiny_model, batch_size=5, progress=False)  # 24 = 4 x 5 + a tail of 4
    assert tiny_model.training, "test() must put the model back into training mode"
    np.testing.assert_allclose(tail["embeddings"], whole["embeddings"], atol=1e-5)
    np.testing.assert_array_equal(tail["accuracy"], whole["accuracy"])
    assert tail["xnorm"] == pytest.approx(whole["xnorm"], rel=1e-5)

    # reference: one image at a time, image + mirror summed in float64, normalised
    tiny_model.eval()
    with paddle.no_grad():
        views = [np.stack([preprocess(im, flip=f) for im in small_bin.images]) for f in (False, True)]
        raw = [tiny_model(paddle.to_tensor(v)).numpy().astype(np.float64) for v in views]
    tiny_model.train()
    ref = raw[0] + raw[1]
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(whole["embeddings"], ref, atol=1e-5)
    assert whole["xnorm"] == pytest.approx(np.mean(np.linalg.norm(np.concatenate(raw), axis=1)), rel=1e-5)
    expected = evaluate(ref, small_bin.issame)
    assert whole["accuracy_mean"] == expected["accuracy_mean"]

    line = next(r.getMessage() for r in caplog.records if "accuracy" in r.getMessage())
    assert "tiny_val.bin" in line and "12 pairs" in line and small_bin.checksum in line


def test_without_flip_uses_the_plain_embedding(small_bin, tiny_model):
    result = verify(small_bin, tiny_model, batch_size=8, flip=False, progress=False)
    tiny_model.eval()
    with paddle.no_grad():
        raw = tiny_model(paddle.to_tensor(np.stack([preprocess(im) for im in small_bin.images]))).numpy()
    tiny_model.train()
    np.testing.assert_allclose(result["embeddings"], raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-5)


def test_nan_model_output_is_a_clear_error(small_bin):
    class NaNNet(paddle.nn.Layer):
        def forward(self, x):
            return paddle.full([x.shape[0], 4], float("nan"))

    with pytest.raises(ValueError, match=r"tiny_val.bin \(12 pairs, sha .*NaN/Inf"):
        verify(small_bin, NaNNet(), batch_size=8, progress=False)
