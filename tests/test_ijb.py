"""eval.ijb on a generated IJB-format set: TAR@FAR equals a plain per-image -> template -> score -> ROC reference."""

import csv
import shutil
from collections import defaultdict

import cv2
import numpy as np
import paddle
import pytest

from eval import ijb
from eval.make_ijb import generate, loose_crop
from eval.make_ijb import main as make_ijb_main
from utils.image import norm_crop, preprocess


@pytest.fixture(scope="module")
def ijb_dir(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("ijb") / "IJBC", "IJBC", identities=5, templates_per_id=2, seed=1)


@pytest.fixture(scope="module")
def model():
    import backbones

    paddle.seed(1)
    net = backbones.get_model("mbf", width=0.25, num_features=32)
    net.eval()
    return net


@pytest.fixture(scope="module")
def result(model, ijb_dir):
    return ijb.evaluate_ijb(model, ijb_dir, "IJBC", batch_size=7, workers=2, progress=False)


def reference_scores(model, ijb_dir):
    """Straight from the files: one face at a time, loops and dicts, no code shared with eval.ijb."""
    rows = [line.split() for line in (ijb_dir / "meta" / "ijbc_name_5pts_score.txt").read_text().splitlines()]
    owners = [line.split() for line in (ijb_dir / "meta" / "ijbc_face_tid_mid.txt").read_text().splitlines()]
    media_feats = defaultdict(lambda: defaultdict(list))
    for (name, *values), (_, template, media) in zip(rows, owners, strict=True):
        image = cv2.cvtColor(cv2.imread(str(ijb_dir / "loose_crop" / name)), cv2.COLOR_BGR2RGB)
        face = norm_crop(image, np.array(values[:10], dtype=np.float32).reshape(5, 2))  # float32, as InsightFace
        with paddle.no_grad():
            out = model(paddle.to_tensor(np.stack([preprocess(face), preprocess(face[:, ::-1].copy())]))).numpy()
        media_feats[int(template)][int(media)].append((out[0] + out[1]).astype(np.float64) * float(values[10]))
    templates = {}
    for template, medias in media_feats.items():
        feat = sum(np.mean(frames, axis=0) for frames in medias.values())
        templates[template] = feat / np.linalg.norm(feat)
    pairs = [tuple(map(int, line.split()))
             for line in (ijb_dir / "meta" / "ijbc_template_pair_label.txt").read_text().splitlines()]
    scores = np.array([templates[a] @ templates[b] for a, b, _ in pairs])
    return np.array([label for _, _, label in pairs]), scores


def reference_roc(labels, scores):
    """ROC points, one per distinct score from the highest down; as sklearn's roc_curve does by default, points
    collinear with both neighbours are dropped, then (0, 0) is put first (InsightFace reads TAR from that curve)."""
    n_neg, n_pos = (labels == 0).sum(), (labels == 1).sum()
    counts = [((scores[labels == 0] >= t).sum(), (scores[labels == 1] >= t).sum())
              for t in sorted(set(scores), reverse=True)]
    keep = [0] + [i for i in range(1, len(counts) - 1)
                  if (counts[i + 1][0] - counts[i][0], counts[i + 1][1] - counts[i][1])
                  != (counts[i][0] - counts[i - 1][0], counts[i][1] - counts[i - 1][1])] + [len(counts) - 1]
    return [(0.0, 0.0)] + [(counts[i][0] / n_neg, counts[i][1] / n_pos) for i in keep]


def reference_tar(points, far_target):
    """InsightFace's reading: the point with the FAR closest to the target; on ties the later point (larger TAR)."""
    best = None
    for far, tar in points:
        if best is None or abs(far - far_target) <= best[0]:
            best = (abs(far - far_target), tar)
    return best[1]


def test_tar_at_far_equals_reference(model, ijb_dir, result):
    rows, labels, scores = result
    ref_labels, ref_scores = reference_scores(model, ijb_dir)
    np.testing.assert_array_equal(labels, ref_labels)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-6)
    assert [r["far_target"] for r in rows] == list(ijb.FAR_TARGETS)
    points = reference_roc(ref_labels, ref_scores)
    for row in rows:
        assert row["tar"] == reference_tar(points, row["far_target"])
        assert row["tar_far_le_target"] == max(tar for far, tar in points if far <= row["far_target"])
    assert 0 < rows[-1]["tar"] <= 1 and labels.sum() == 5 and len(labels) == 45  # 5 ids x 2 templates


def test_cli_writes_table_csv_and_png(model, ijb_dir, result, tmp_path, capsys):
    weights = tmp_path / "tiny.pdparams"
    paddle.save(model.state_dict(), str(weights))
    args = ["--data", str(ijb_dir), "--target", "IJBC", "--network", "mbf", "--width", "0.25", "--embedding-size",
            "32", "--weights", str(weights), "--out", str(tmp_path / "out"), "--batch-size", "16"]
    assert ijb.main(args) == 0
    assert "IJBC TAR (%) at FAR" in capsys.readouterr().out
    with open(tmp_path / "out" / "ijbc_tar_far.csv") as f:
        table = list(csv.DictReader(f))
    assert [float(r["tar"]) for r in table] == [r["tar"] for r in result[0]]
    png = cv2.imread(str(tmp_path / "out" / "ijbc_roc.png"))
    assert png is not None and png.shape[0] > 100
    np.testing.assert_allclose(np.load(tmp_path / "out" / "ijbc_scores.npy"), result[2], atol=1e-6)
    with pytest.raises(SystemExit):  # refuses to overwrite without --force
        ijb.main(args)
    assert "use --force" in capsys.readouterr().err


@pytest.fixture
def ijb_copy(ijb_dir, tmp_path):
    return shutil.copytree(ijb_dir, tmp_path / "IJBC")


def test_missing_images_are_a_clear_error(model, ijb_copy):
    (ijb_copy / "loose_crop" / "3.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of \d+ images .* missing from .*loose_crop, e.g. 3.jpg"):
        ijb.evaluate_ijb(model, ijb_copy, "IJBC", progress=False)


def test_undecodable_image_is_a_clear_error(model, ijb_copy):
    (ijb_copy / "loose_crop" / "1.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=r"1\.jpg: cannot decode image"):
        ijb.evaluate_ijb(model, ijb_copy, "IJBC", progress=False)


def test_missing_meta_file_is_a_clear_error(model, ijb_copy):
    (ijb_copy / "meta" / "ijbc_template_pair_label.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"IJB meta file missing: .*ijbc_template_pair_label\.txt"):
        ijb.read_meta(ijb_copy, "IJBC")


def test_upper_case_meta_names_are_accepted(ijb_copy):
    for path in (ijb_copy / "meta").iterdir():
        path.rename(path.with_name(path.name.replace("ijbc", "IJBC")))
    assert len(ijb.read_meta(ijb_copy, "IJBC").labels) == 45


@pytest.mark.parametrize(("file", "edit", "message"), [
    ("ijbc_name_5pts_score.txt", lambda lines: [lines[0], lines[1].rsplit(" ", 1)[0], *lines[2:]],
     r"ijbc_name_5pts_score.txt:2: expected 12 fields, got 11"),
    ("ijbc_name_5pts_score.txt", lambda lines: [lines[1], lines[0], *lines[2:]],
     "face 1: ijbc_face_tid_mid.txt names 1.jpg but ijbc_name_5pts_score.txt names 2.jpg"),
    ("ijbc_face_tid_mid.txt", lambda lines: lines[:-1], r"lists \d+ faces but .* \d+"),
    ("ijbc_template_pair_label.txt", lambda lines: [*lines, "1 999 0"], "1 pairs name templates without faces"),
    ("ijbc_template_pair_label.txt", lambda lines: [ln.rsplit(" ", 1)[0] + " 1" for ln in lines], "both present"),
])
def test_inconsistent_meta_files_are_clear_errors(ijb_copy, file, edit, message):
    path = ijb_copy / "meta" / file
    path.write_text("\n".join(edit(path.read_text().splitlines())) + "\n")
    with pytest.raises(ValueError, match=message):
        ijb.read_meta(ijb_copy, "IJBC")


def test_loose_crop_landmarks_follow_the_face():
    """Aligning the pasted face with its mapped landmarks gives back the face aligned from the original ones."""
    from utils.faces import render_face, sample_identity

    rng = np.random.default_rng(3)
    face, marks = render_face(sample_identity(rng), rng)
    image, moved = loose_crop(face, marks, rng)
    assert image.shape[0] > 112 and not np.allclose(moved, marks)
    direct, via_crop = norm_crop(face, marks).astype(float), norm_crop(image, moved).astype(float)
    inner = (slice(20, 92), slice(20, 92))  # away from the borders the two warps fill differently
    assert np.abs(direct[inner] - via_crop[inner]).mean() < 6


def test_make_ijb_refuses_to_overwrite_without_force(tmp_path, capsys):
    out = tmp_path / "IJBB"
    args = ["--out", str(out), "--target", "IJBB", "--identities", "2", "--templates-per-id", "2", "--seed", "4"]
    assert make_ijb_main(args) == 0
    names = sorted(p.name for p in (out / "meta").iterdir())
    assert names == ["ijbb_face_tid_mid.txt", "ijbb_name_5pts_score.txt", "ijbb_template_pair_label.txt"]
    before = (out / "meta" / "ijbb_face_tid_mid.txt").read_text()
    with pytest.raises(SystemExit):
        make_ijb_main(args)
    assert "use --force" in capsys.readouterr().err
    assert make_ijb_main([*args[:-1], "5", "--force"]) == 0
    assert (out / "meta" / "ijbb_face_tid_mid.txt").read_text() != before
    assert [p.name for p in tmp_path.iterdir()] == ["IJBB"]  # no temp directories left
