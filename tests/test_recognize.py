"""The recognition demo end to end on synthetic faces pasted on a background, and its failure modes."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from deploy.face_files import read_rgb
from tests.export_models import calibrated_weights
from tools import gallery as gallery_tool
from tools import recognize as recognize_tool
from tools.make_face_demo import make_demo


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("recognize")
    make_demo(root / "demo", identities=3, gallery_images=2, seed=0)  # seed 0: the Haar cascade finds 3 of 4
    model = ["--network", "mbf", "--width", "0.25", "--embedding-size", "64", "--weights",
             str(calibrated_weights("mbf", root / "mbf.pdparams", 0.25, 64))]
    index = root / "index.npz"
    assert gallery_tool.main(["build", "--images", str(root / "demo" / "gallery"), "--out", str(index),
                              *model]) == 0
    return root / "demo", index, model


def test_demo_writes_annotated_image(setup, tmp_path, capsys):
    demo, index, model = setup
    out = tmp_path / "annotated.png"
    assert recognize_tool.main(["--image", str(demo / "photo.png"), "--faces", str(demo / "faces.json"),
                                "--index", str(index), "--out", str(out), "--threshold", "-1", *model]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    faces = json.loads((demo / "faces.json").read_text())
    assert len(lines) == len(faces) == 4
    assert all(line["identity"] in ("person_00", "person_01", "person_02") for line in lines)  # threshold -1
    photo, annotated = read_rgb(demo / "photo.png"), read_rgb(out)
    assert annotated.shape == photo.shape
    for face in faces:  # a box on each face, the face itself untouched
        x1, y1, x2, y2 = face["box"]
        assert np.abs(annotated[y1, x1:x2].astype(int) - photo[y1, x1:x2]).mean() > 20
        inner = (slice(y1 + 40, y2 - 10), slice(x1 + 10, x2 - 10))  # a label may sit inside the top
        assert np.array_equal(annotated[inner], photo[inner])


def inside(a, b) -> float:
    """The fraction of box a that lies in box b."""
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    return inter / ((a[2] - a[0]) * (a[3] - a[1]))


def test_haar_default_detector_end_to_end(setup, tmp_path, capsys):
    demo, index, model = setup
    out = tmp_path / "annotated.jpg"
    assert recognize_tool.main(["--image", str(demo / "photo.png"), "--index", str(index), "--out", str(out),
                                "--threshold", "-1", *model]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    truth = [face["box"] for face in json.loads((demo / "faces.json").read_text())]
    assert len(lines) == 3  # of the 4 pasted faces; no false detection on the textured background
    matched = [max(range(len(truth)), key=lambda i, b=line["box"]: inside(b, truth[i])) for line in lines]
    assert len(set(matched)) == 3  # three different faces, each box mostly on its face
    assert all(inside(line["box"], truth[i]) > 0.8 for line, i in zip(lines, matched, strict=True))
    assert all(line["identity"] in ("person_00", "person_01", "person_02") for line in lines)  # threshold -1
    photo, annotated = read_rgb(demo / "photo.png"), read_rgb(out)
    assert annotated.shape == photo.shape
    for line in lines:  # a box drawn on each detected face's bottom edge
        x1, _, x2, y2 = (round(v) for v in line["box"])
        assert np.abs(annotated[y2, x1:x2].astype(int) - photo[y2, x1:x2]).mean() > 20


def test_haar_no_face_in_background(setup, tmp_path, capsys):
    _, index, model = setup
    background = np.random.default_rng(0).uniform(60, 200, (10, 20, 3)).astype(np.float32)
    photo = cv2.resize(background, (640, 320), interpolation=cv2.INTER_CUBIC).clip(0, 255).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "empty.png"), photo)
    assert recognize_tool.main(["--image", str(tmp_path / "empty.png"), "--index", str(index),
                                "--out", str(tmp_path / "out.png"), *model]) == recognize_tool.NO_FACE_EXIT
    assert "empty.png: no face found" in capsys.readouterr().err
    assert not (tmp_path / "out.png").exists()


def test_haar_cascade_missing(setup, tmp_path, capsys, monkeypatch):
    demo, index, model = setup
    monkeypatch.setattr(cv2.data, "haarcascades", str(tmp_path))  # as in OpenCV 5, which ships no cascades
    assert recognize_tool.main(["--image", str(demo / "photo.png"), "--index", str(index),
                                "--out", str(tmp_path / "out.png"), *model]) == 1
    assert "haarcascade_frontalface_alt2.xml: no Haar cascade in OpenCV" in capsys.readouterr().err
    assert not (tmp_path / "out.png").exists()


def test_box_without_landmarks_and_unknown_label(setup, tmp_path, capsys):
    demo, index, model = setup
    faces = json.loads((demo / "faces.json").read_text())
    (tmp_path / "boxes.json").write_text(json.dumps([{"box": f["box"]} for f in faces]))
    assert recognize_tool.main(["--image", str(demo / "photo.png"), "--faces", str(tmp_path / "boxes.json"),
                                "--index", str(index), "--out", str(tmp_path / "a.jpg"), "--threshold", "1",
                                *model]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["identity"] for line in lines] == ["unknown"] * 4  # nobody reaches a score of 1
    assert read_rgb(tmp_path / "a.jpg").shape == read_rgb(demo / "photo.png").shape


def test_no_face_found(setup, tmp_path, capsys):
    demo, index, model = setup
    (tmp_path / "none.json").write_text("[]")
    args = ["--image", str(demo / "photo.png"), "--faces", str(tmp_path / "none.json"), "--index", str(index),
            "--out", str(tmp_path / "out.png"), *model]
    assert recognize_tool.main(args) == recognize_tool.NO_FACE_EXIT
    assert "photo.png: no face found" in capsys.readouterr().err
    assert not (tmp_path / "out.png").exists()
    assert recognize_tool.main([*args, "--allow-empty"]) == 0
    assert np.array_equal(read_rgb(tmp_path / "out.png"), read_rgb(demo / "photo.png"))


@pytest.mark.parametrize(("faces", "message"), [
    ('[{"box": [10, 10, 5, 50]}]', "box must be [x1, y1, x2, y2]"),
    ('[{"box": [5000, 10, 5100, 50]}]', "is outside the image"),
    ('[{"box": [10, 10, 60, 60], "landmarks": [[1, 2]]}]', "landmarks must be 5"),
    ('{"box": [10, 10, 60, 60]}', "expected a JSON list"),
])
def test_bad_faces_file(setup, tmp_path, capsys, faces, message):
    demo, index, model = setup
    (tmp_path / "faces.json").write_text(faces)
    assert recognize_tool.main(["--image", str(demo / "photo.png"), "--faces", str(tmp_path / "faces.json"),
                                "--index", str(index), "--out", str(tmp_path / "out.png"), *model]) == 1
    err = capsys.readouterr().err
    assert "faces.json: bad faces file" in err and message in err
    assert not (tmp_path / "out.png").exists()


def test_bad_image_and_bad_detector(setup, tmp_path, capsys):
    demo, index, model = setup
    common = ["--index", str(index), "--out", str(tmp_path / "out.png"), *model]
    (tmp_path / "broken.jpg").write_bytes(b"\x89PNG garbage")
    assert recognize_tool.main(["--image", str(tmp_path / "broken.jpg"), "--faces", str(demo / "faces.json"),
                                *common]) == 1
    assert "broken.jpg: unreadable image" in capsys.readouterr().err
    (tmp_path / "det.onnx").write_bytes(b"not an onnx model")
    assert recognize_tool.main(["--image", str(demo / "photo.png"), "--detector", str(tmp_path / "det.onnx"),
                                *common]) == 1
    assert "det.onnx: cannot run it as an OpenCV YuNet face detector" in capsys.readouterr().err
    assert not (tmp_path / "out.png").exists()
