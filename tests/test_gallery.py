"""Gallery index (build, search, file format), tools/gallery.py and tools/inference.py end to end."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from deploy.embedder import load_embedder
from deploy.face_files import read_rgb
from deploy.gallery import UNKNOWN, GalleryIndex, build_index
from tests.export_models import calibrated_weights
from tools import gallery as gallery_tool
from tools import inference as inference_tool
from tools.make_face_demo import make_demo
from utils.image import norm_crop


def clustered_embeddings(rng, identities: int, per_id: int, dim: int = 32, noise: float = 0.25):
    """Images of each identity = its random direction + noise: the geometry a trained model gives."""
    centres = rng.normal(size=(identities, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    emb = np.repeat(centres, per_id, axis=0) + noise * rng.normal(size=(identities * per_id, dim)) / np.sqrt(dim)
    emb *= rng.uniform(5, 30, (len(emb), 1))  # unnormalised, as networks output them
    return emb.astype(np.float32), np.repeat([f"id{i}" for i in range(identities)], per_id)


def reference_scores(gallery, labels, queries, per_image):
    """Cosine score of each query against each identity, with plain loops."""
    unit = [g / np.linalg.norm(g) for g in gallery]
    out = []
    for q in queries:
        q = q / np.linalg.norm(q)
        row = {}
        for name in sorted(set(labels)):
            members = [u for u, lab in zip(unit, labels, strict=True) if lab == name]
            if per_image:
                row[name] = max(float(q @ u) for u in members)
            else:
                mean = np.sum(members, axis=0)
                row[name] = float(q @ (mean / np.linalg.norm(mean)))
        out.append(row)
    return out


@pytest.mark.parametrize("per_image", [False, True])
def test_search_ranks_like_a_brute_force_reference(per_image):
    rng = np.random.default_rng(0)
    emb, labels = clustered_embeddings(rng, identities=6, per_id=5)
    known = np.isin(labels, ["id0", "id1", "id2", "id3"])
    in_gallery = known & (np.arange(len(labels)) % 5 < 3)  # 3 images of each known identity in the gallery
    queries = ~in_gallery  # 2 new images of each known identity + all images of 2 strangers
    index = build_index(emb[in_gallery], list(labels[in_gallery]), [f"{i}.png" for i in np.flatnonzero(in_gallery)],
                        per_image=per_image)
    assert len(index.embeddings) == (12 if per_image else 4)
    results = index.search(emb[queries], top_k=3, threshold=0.5)
    expected = reference_scores(emb[in_gallery], list(labels[in_gallery]), emb[queries], per_image)
    for result, truth, ref in zip(results, labels[queries], expected, strict=True):
        ranked = sorted(ref.items(), key=lambda kv: -kv[1])[:3]
        assert [t["identity"] for t in result["top_k"]] == [name for name, _ in ranked]
        np.testing.assert_allclose([t["score"] for t in result["top_k"]], [s for _, s in ranked], atol=1e-5)
        assert result["identity"] == (truth if truth in ("id0", "id1", "id2", "id3") else UNKNOWN)


def test_index_file_round_trip_and_bad_files(tmp_path):
    rng = np.random.default_rng(1)
    emb, labels = clustered_embeddings(rng, identities=3, per_id=2)
    index = build_index(emb, list(labels), [f"{i}.png" for i in range(6)], per_image=True,
                        meta={"network": "mbf", "embedding_size": 32})
    path = tmp_path / "index.npz"
    index.save(path)
    with np.load(path, allow_pickle=False) as z:  # plain arrays only
        assert all(z[k].dtype != object for k in z.files)
    loaded = GalleryIndex.load(path)
    np.testing.assert_array_equal(loaded.embeddings, index.embeddings)
    assert list(loaded.identities) == list(labels) and loaded.per_image and loaded.meta["network"] == "mbf"
    with pytest.raises(FileExistsError, match="use --force"):
        index.save(path)

    with pytest.raises(ValueError, match="holds 32-d embeddings but the model gives 64-d"):
        loaded.check_model(64, {})
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"junk\.npz: unreadable gallery index"):
        GalleryIndex.load(tmp_path / "junk.npz")
    np.savez(tmp_path / "other.npz", embeddings=emb)
    with pytest.raises(ValueError, match=r"other\.npz: .*not a gallery index \(missing files"):
        GalleryIndex.load(tmp_path / "other.npz")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A synthetic demo folder and two tiny calibrated models with 64-d and 32-d embeddings."""
    root = tmp_path_factory.mktemp("gallery")
    make_demo(root / "demo", identities=3, gallery_images=2, seed=1)
    return {"root": root, "demo": root / "demo",
            "model64": ["--network", "mbf", "--width", "0.25", "--embedding-size", "64", "--weights",
                        str(calibrated_weights("mbf", root / "mbf64.pdparams", 0.25, 64))],
            "model32": ["--network", "mbf", "--width", "0.25", "--embedding-size", "32", "--weights",
                        str(calibrated_weights("mbf", root / "mbf32.pdparams", 0.25, 32, seed=1))]}


def test_gallery_cli_build_search_and_model_mismatch(demo, tmp_path, capsys):
    index = tmp_path / "index.npz"
    gallery = str(demo["demo"] / "gallery")
    assert gallery_tool.main(["build", "--images", gallery, "--out", str(index), "--per-image", *demo["model64"]]) == 0
    assert "3 identities, 6 images (6 aligned), 64-d" in capsys.readouterr().out
    # the gallery's own images: each finds itself (score 1) first
    assert gallery_tool.main(["search", "--index", str(index), "--query", gallery, "--top-k", "2", "--threshold",
                              "0.5", *demo["model64"]]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 6
    for line in lines:
        assert line["identity"] == line["file"].split("/")[0] and line["score"] == pytest.approx(1.0, abs=1e-5)
        assert len(line["top_k"]) == 2
    assert gallery_tool.main(["search", "--index", str(index), "--query", gallery, *demo["model32"]]) == 1
    assert "holds 64-d embeddings but the model gives 32-d" in capsys.readouterr().err


def test_gallery_cli_bad_images(demo, tmp_path, capsys):
    images = tmp_path / "people"
    (images / "alice").mkdir(parents=True)
    for name in ("0.png", "1.png"):
        (images / "alice" / name).write_bytes((demo["demo"] / "gallery" / "person_00" / name).read_bytes())
    (images / "alice" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    index = tmp_path / "index.npz"
    assert gallery_tool.main(["build", "--images", str(images), "--out", str(index), *demo["model64"]]) == 1
    assert "broken.jpg: unreadable image" in capsys.readouterr().err
    assert not index.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["people"]
    assert gallery_tool.main(["build", "--images", str(images), "--out", str(index), "--skip-bad",
                              *demo["model64"]]) == 0
    assert "skipped" in capsys.readouterr().err and GalleryIndex.load(index).meta["skipped"] == 1

    cv2.imwrite(str(images / "alice" / "wide.png"), np.zeros((150, 300, 3), np.uint8))
    (images / "alice" / "broken.jpg").unlink()
    assert gallery_tool.main(["build", "--images", str(images), "--out", str(index), "--force",
                              *demo["model64"]]) == 1
    assert capsys.readouterr().err.endswith("wide.png: no face found by the Haar cascade (300x150)\n")


def test_inference_cli_crops_landmarks_and_bad_input(demo, tmp_path, capsys):
    gallery = demo["demo"] / "gallery"
    out = tmp_path / "emb"
    assert inference_tool.main(["--input", str(gallery), "--output", str(out), *demo["model64"]]) == 0
    emb = np.load(tmp_path / "emb.npy", allow_pickle=False)
    listing = json.loads((tmp_path / "emb.json").read_text())
    assert emb.shape == (6, 64) and len(listing["files"]) == 6 and listing["normalized"]
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    embedder = load_embedder(network="mbf", weights=demo["model64"][-1], width=0.25, embedding_size=64)
    direct = embedder.embed(np.stack([read_rgb(gallery / f) for f in listing["files"]]))
    np.testing.assert_allclose(emb, direct / np.linalg.norm(direct, axis=1, keepdims=True), atol=1e-5)

    # full image + landmarks (text format): each face of the demo photo aligned with its 5 points
    faces = json.loads((demo["demo"] / "faces.json").read_text())
    photo = tmp_path / "photos"
    photo.mkdir()
    lines = []
    for i, face in enumerate(faces[:2]):
        (photo / f"p{i}.png").write_bytes((demo["demo"] / "photo.png").read_bytes())
        lines.append(f"p{i}.png " + " ".join(str(v) for v in np.ravel(face["landmarks"])))
    (tmp_path / "marks.txt").write_text("\n".join(lines) + "\n")
    assert inference_tool.main(["--input", str(photo), "--landmarks", str(tmp_path / "marks.txt"), "--raw",
                                "--output", str(tmp_path / "full"), *demo["model64"]]) == 0
    crops = np.stack([norm_crop(read_rgb(demo["demo"] / "photo.png"), f["landmarks"]) for f in faces[:2]])
    np.testing.assert_allclose(np.load(tmp_path / "full.npy"), embedder.embed(crops), atol=1e-5)

    capsys.readouterr()
    (photo / "p2.png").write_bytes(b"")
    assert inference_tool.main(["--input", str(photo), "--landmarks", str(tmp_path / "marks.txt"),
                                "--output", str(tmp_path / "again"), *demo["model64"]]) == 1
    assert "p2.png: unreadable image" in capsys.readouterr().err
    assert not list(tmp_path.glob("again*"))
    assert inference_tool.main(["--input", str(gallery), "--output", str(out), *demo["model64"]]) == 1
    assert "emb.npy: exists (use --force" in capsys.readouterr().err
