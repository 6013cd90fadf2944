"""Ordinary photos in the gallery and inference tools: the face is found (Haar) and cropped as recognize.py crops it;
a tight face crop the cascade misses is named as one and can be embedded whole (--detect none)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from deploy.embedder import l2_normalize, load_embedder
from deploy.face_detect import Detection, crop_face
from deploy.face_files import face_crop, read_rgb
from deploy.gallery import GalleryIndex
from tests.export_models import calibrated_weights
from tools import gallery as gallery_tool
from tools import inference as inference_tool
from tools import recognize as recognize_tool
from tools.make_face_demo import make_demo
from utils.faces import render_face, sample_identity

HAAR = "haarcascade_frontalface_alt2.xml"


def haar_boxes(image_rgb: np.ndarray) -> list[list[int]]:
    """The cascade run here directly, with the settings docs/export.md gives: [x1, y1, x2, y2] boxes."""
    cascade = cv2.CascadeClassifier(str(Path(cv2.data.haarcascades) / HAAR))
    found = cascade.detectMultiScale(cv2.cvtColor(image_rgb, cv2.COLOR_RGB2GRAY), 1.1, 3, minSize=(40, 40))
    return [[x, y, x + w, y + h] for x, y, w, h in found]


def box_crop(image_rgb: np.ndarray, box: list[int], margin: float = 1.2) -> np.ndarray:
    """Reference crop: the square of side margin x the box's larger side around the box centre, resized to 112."""
    side = round(margin * max(box[2] - box[0], box[3] - box[1]))
    centre = ((box[0] + box[2]) / 2 - 0.5, (box[1] + box[3]) / 2 - 0.5)  # pixel-centre coordinates
    return cv2.resize(cv2.getRectSubPix(image_rgb, (side, side), centre), (112, 112))


def inside(a, b) -> float:
    """The fraction of box a that lies in box b."""
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    return inter / ((a[2] - a[0]) * (a[3] - a[1]))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Photos of the demo's people: each face of make_face_demo's group photo (seed 0) cut out with the textured
    background around it, as an ordinary non-square photo (JPEG); a tiny calibrated model."""
    root = tmp_path_factory.mktemp("photos")
    make_demo(root / "demo", identities=3, gallery_images=2, seed=0)
    photo = read_rgb(root / "demo" / "photo.png")
    faces = json.loads((root / "demo" / "faces.json").read_text())
    names = json.loads((root / "demo" / "truth.json").read_text())
    truth = {}
    for face, name in zip(faces, names, strict=True):
        x1, y1, x2, y2 = face["box"]
        top, left = max(0, y1 - 20), max(0, x1 - 30)
        cut = photo[top:min(photo.shape[0], y2 + 40), left:min(photo.shape[1], x2 + 50)]
        (root / "photos" / name).mkdir(parents=True)
        cv2.imwrite(str(root / "photos" / name / "photo.jpg"), cv2.cvtColor(cut, cv2.COLOR_RGB2BGR),
                    [cv2.IMWRITE_JPEG_QUALITY, 95])
        truth[name] = [x1 - left, y1 - top, x2 - left, y2 - top]
    weights = calibrated_weights("mbf", root / "mbf.pdparams", 0.25, 64)
    model = ["--network", "mbf", "--width", "0.25", "--embedding-size", "64", "--weights", str(weights)]
    embedder = load_embedder(network="mbf", weights=weights, width=0.25, embedding_size=64)
    return root, truth, model, embedder


def test_gallery_builds_from_ordinary_photos(setup, tmp_path, capsys):
    root, truth, model, embedder = setup
    photos = root / "photos"
    index = tmp_path / "index.npz"
    assert gallery_tool.main(["build", "--images", str(photos), "--out", str(index), "--per-image", "--skip-bad",
                              *model]) == 0
    captured = capsys.readouterr()
    assert "3 identities, 3 images (3 haar), 64-d" in captured.out
    # the stranger's photo: the cascade misses it (as it misses that face in the group photo), and says so
    assert "stranger/photo.jpg: no face found by the Haar cascade" in captured.err
    built = GalleryIndex.load(index)
    assert built.meta["crops"] == {"haar": 3} and list(built.identities) == ["person_00", "person_01", "person_02"]
    for name, embedding in zip(built.identities, built.embeddings, strict=True):
        image = read_rgb(photos / name / "photo.jpg")
        assert image.shape[0] != image.shape[1]  # ordinary photos, not square crops
        (box,) = haar_boxes(image)
        assert inside(box, truth[name]) > 0.8  # the cascade found the face, not the background
        crop, how = face_crop(photos, f"{name}/photo.jpg")  # what every tool crops from a photo
        assert how == "haar" and np.abs(crop.astype(int) - box_crop(image, box)).mean() < 1
        # the tool embedded exactly that crop (an untrained net moves ~4% in cosine for +-1 pixel noise)
        np.testing.assert_allclose(embedding, l2_normalize(embedder.embed(crop[None]))[0], atol=1e-5)

    # a query photo goes through the same detection: each finds its own gallery entry with score 1
    assert gallery_tool.main(["search", "--index", str(index), "--query", str(photos / "person_01" / "photo.jpg"),
                              *model]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["identity"] == "person_01" and result["score"] == pytest.approx(1.0, abs=1e-5)


def test_crop_geometry_matches_a_plain_resize():
    """A box crop is a square around the box centre resized to 112: for the whole of a square image, a resize."""
    rng = np.random.default_rng(0)
    image = cv2.resize(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8), (227, 227), interpolation=cv2.INTER_CUBIC)
    whole = crop_face(image, {"box": np.array([0, 0, 227, 227]), "landmarks": None})
    assert np.abs(whole.astype(int) - cv2.resize(image, (112, 112))).max() <= 1
    photo = cv2.copyMakeBorder(image, 31, 17, 45, 8, cv2.BORDER_REFLECT)
    box = [60, 40, 60 + 150, 40 + 150]
    assert np.abs(crop_face(photo, {"box": np.array(box), "landmarks": None}, 1.2).astype(int)
                  - box_crop(photo, box)).mean() < 1


def tight_crop(path: Path, seed_index: int = 4) -> np.ndarray:
    """A 227x248 portrait crop of a synthetic face (the face fills it) saved as an RGBA PNG with a transparent
    background outside the head's ellipse; returns its RGB pixels as the tools decode them."""
    rng = np.random.default_rng(5)
    for _ in range(seed_index):
        render_face(sample_identity(rng), rng, size=248)
    image, _ = render_face(sample_identity(rng), rng, size=248)
    image = np.ascontiguousarray(image[:, 10:237])
    alpha = np.zeros(image.shape[:2], np.uint8)
    cv2.ellipse(alpha, (113, 124), (105, 122), 0, 0, 360, 255, -1)
    rgba = np.dstack([image, alpha])
    rgba[alpha == 0] = 0
    cv2.imwrite(str(path), cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
    return rgba[:, :, :3]


def test_tight_face_crop_is_named_and_embeds_whole(setup, tmp_path, capsys):
    _, _, model, embedder = setup
    (tmp_path / "people" / "carol").mkdir(parents=True)
    path = tmp_path / "people" / "carol" / "portrait.png"
    pixels = tight_crop(path)
    assert cv2.imread(str(path), cv2.IMREAD_UNCHANGED).shape == (248, 227, 4)
    assert haar_boxes(pixels) == []  # the cascade misses a face that fills the image
    index = tmp_path / "index.npz"
    assert gallery_tool.main(["build", "--images", str(tmp_path / "people"), "--out", str(index), *model]) == 1
    assert capsys.readouterr().err == (
        f"error: {path}: no face found by the Haar cascade (227x248); it is shaped like a tight face crop, which the "
        "detector often misses: if it is one, --detect none embeds the whole image\n")
    assert not index.exists()

    assert gallery_tool.main(["build", "--images", str(tmp_path / "people"), "--out", str(index), "--detect", "none",
                              *model]) == 0
    assert "1 identities, 1 images (1 whole)" in capsys.readouterr().out
    # the whole image: squared (centred, black bars on the narrow sides) and resized to 112x112
    crop, how = face_crop(path.parent, path.name, detection=Detection("none"))
    square = cv2.copyMakeBorder(pixels, 0, 0, 10, 11, cv2.BORDER_CONSTANT, value=0)
    assert how == "whole" and np.abs(crop.astype(int) - cv2.resize(square, (112, 112))).mean() < 1
    np.testing.assert_allclose(GalleryIndex.load(index).embeddings[0], l2_normalize(embedder.embed(crop[None]))[0],
                               atol=1e-5)

    # recognize.py: the same message (exit 2), and the same whole-image path
    args = ["--image", str(path), "--index", str(index), "--out", str(tmp_path / "a.png"), "--threshold", "-1", *model]
    assert recognize_tool.main(args) == recognize_tool.NO_FACE_EXIT
    assert "it is shaped like a tight face crop" in capsys.readouterr().err
    assert recognize_tool.main([*args, "--detect", "none"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert json.loads(line)["box"] == [0, 0, 227, 248] and json.loads(line)["identity"] == "carol"


def test_largest_face_of_a_group_photo(setup, tmp_path, capsys):
    root, _, model, embedder = setup
    photo = root / "demo" / "photo.png"
    assert inference_tool.main(["--input", str(photo), "--output", str(tmp_path / "emb"), "--raw", *model]) == 0
    listing = json.loads((tmp_path / "emb.json").read_text())
    assert listing["files"] == ["photo.png"] and listing["crops"] == ["haar"]
    image = read_rgb(photo)
    boxes = haar_boxes(image)
    assert len(boxes) == 3
    largest = max(boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))
    crop, _ = face_crop(photo.parent, photo.name)
    assert np.abs(crop.astype(int) - box_crop(image, largest)).mean() < 1
    np.testing.assert_allclose(np.load(tmp_path / "emb.npy")[0], embedder.embed(crop[None])[0], atol=1e-5)


def test_small_image_and_option_conflicts(setup, tmp_path, capsys):
    _, _, model, _ = setup
    cv2.imwrite(str(tmp_path / "tiny.png"), np.full((36, 30, 3), 128, np.uint8))
    out = ["--output", str(tmp_path / "emb"), *model]
    assert inference_tool.main(["--input", str(tmp_path / "tiny.png"), *out]) == 1
    assert capsys.readouterr().err.endswith(
        "tiny.png: no face found by the Haar cascade (30x36): smaller than the smallest face it finds (40 px); "
        "--detect none embeds it whole\n")
    assert inference_tool.main(["--input", str(tmp_path / "tiny.png"), "--detect", "none", "--detector", "y.onnx",
                                *out]) == 1
    assert "--detect none embeds whole images: it takes no --detector" in capsys.readouterr().err
    (tmp_path / "marks.txt").write_text("tiny.png 10 15 20 15 15 20 11 25 19 25\n")
    assert inference_tool.main(["--input", str(tmp_path / "tiny.png"), "--landmarks", str(tmp_path / "marks.txt"),
                                "--detect", "none", *out]) == 1  # would be ignored: the landmarks give the face
    assert "--landmarks gives the faces: it takes no --detector or --detect none" in capsys.readouterr().err
    assert not list(tmp_path.glob("emb*"))
    assert recognize_tool.main(["--image", str(tmp_path / "tiny.png"), "--faces", str(tmp_path / "faces.json"),
                                "--detector", "y.onnx", "--index", str(tmp_path / "i.npz"),
                                "--out", str(tmp_path / "a.png"), *model]) == 1
    assert "--faces gives the faces: it takes no --detector" in capsys.readouterr().err
