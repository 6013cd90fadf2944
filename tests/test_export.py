"""Export parity (dygraph vs Paddle Inference vs ONNX Runtime), batch handling and export failures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from deploy.embedder import DygraphEmbedder, OnnxEmbedder, PaddleInferenceEmbedder, load_backbone, load_embedder
from tests.export_models import calibrated_weights, synthetic_faces
from tools import export as export_tool
from utils.atomic import atomic_output_dir

ROOT = Path(__file__).resolve().parent.parent

try:
    import paddle2onnx  # noqa: F401

    FORMATS = ("paddle", "onnx")
except ImportError:  # the ONNX half is skipped only when paddle2onnx cannot be installed
    FORMATS = ("paddle",)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """r18 and mbf at full width: (weights, export directory); r18 frozen to batch 2, mbf with a dynamic batch."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    for network, batch_size in (("r18", 2), ("mbf", None)):
        weights = calibrated_weights(network, root / f"{network}.pdparams")
        export_tool.export(network, weights, root / network, FORMATS, batch_size=batch_size)
        out[network] = weights, root / network
    return out


@pytest.mark.slow
@pytest.mark.parametrize("network", ["r18", "mbf"])
def test_parity_dygraph_paddle_onnx(exported, network):
    weights, directory = exported[network]
    faces = synthetic_faces(2, seed=7)
    reference = DygraphEmbedder(load_backbone(network, weights), 512).embed(faces)
    assert np.abs(reference).max() > 0.5  # a model of realistic scale, not a collapsed one
    runners = [PaddleInferenceEmbedder(directory)] + ([OnnxEmbedder(directory / "model.onnx")]
                                                       if "onnx" in FORMATS else [])
    for runner in runners:
        diff = np.abs(runner.embed(faces) - reference).max()
        assert diff <= 1e-4, f"{network} {runner.backend}: max abs diff {diff}"
    meta = load_embedder(directory).meta
    assert meta["network"] == network and meta["embedding_size"] == 512
    assert max(meta["parity_max_abs_diff"].values()) <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("backend", FORMATS)
def test_dynamic_batch_sizes(exported, backend):
    runner = load_embedder(exported["mbf"][1], backend=backend)
    assert runner.fixed_batch is None
    faces = synthetic_faces(3, seed=11)
    three = runner.embed(faces, batch_size=3)
    ones = np.concatenate([runner.embed(faces[i:i + 1]) for i in range(3)])
    assert three.shape == (3, 512)
    np.testing.assert_allclose(ones, three, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("backend", FORMATS)
def test_fixed_batch_pads_and_refuses_other_shapes(exported, backend):
    runner = load_embedder(exported["r18"][1], backend=backend)
    assert runner.fixed_batch == 2
    faces = synthetic_faces(3, seed=3)
    # 3 images through a batch-2 model: the tail is padded; each row equals the image embedded alone
    np.testing.assert_allclose(runner.embed(faces)[2:], runner.embed(faces[2:]), atol=1e-5)
    with pytest.raises(ValueError, match="fixed batch of 2, got a batch of 3"):
        runner.forward(np.zeros((3, 3, 112, 112), np.float32))
    with pytest.raises(ValueError, match=r"expects input \[N, 3, 112, 112\], got \[2, 3, 96, 96\]"):
        runner.forward(np.zeros((2, 3, 96, 96), np.float32))
    with pytest.raises(ValueError, match="aligned 112x112 RGB crops"):
        runner.embed(np.zeros((2, 100, 100, 3), np.uint8))


def test_mismatched_weights_fail_and_write_nothing(tmp_path, capsys):
    weights = calibrated_weights("mbf", tmp_path / "mbf.pdparams", width=0.25, embedding_size=64)
    out = tmp_path / "out"
    code = export_tool.main(["--network", "r18", "--weights", str(weights), "--output", str(out), "--width", "0.25",
                             "--embedding-size", "64"])
    err = capsys.readouterr().err
    assert code == 1 and "not a r18" in err and "missing:" in err and "unexpected:" in err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["mbf.pdparams"]


def test_failed_export_and_existing_output_write_nothing(tmp_path, monkeypatch, capsys):
    weights = calibrated_weights("mbf", tmp_path / "mbf.pdparams", width=0.25, embedding_size=64)
    args = ["--network", "mbf", "--weights", str(weights), "--width", "0.25", "--embedding-size", "64"]

    def broken_save(model, out_dir, batch_size):  # a conversion that dies half-way through
        (out_dir / "model.json").write_text("{")
        raise RuntimeError("conversion failed")

    monkeypatch.setattr(export_tool, "save_paddle", broken_save)
    assert export_tool.main([*args, "--output", str(tmp_path / "bad")]) == 1
    assert "conversion failed" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mbf.pdparams"]  # no output, no temp dir

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    assert export_tool.main([*args, "--output", str(tmp_path / "taken")]) == 1
    assert "use --force" in capsys.readouterr().err
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


def test_an_output_directory_is_swapped_whole_or_not_at_all(tmp_path):
    """utils.atomic.atomic_output_dir, which export and make_ijb build their folders in."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_output_dir(tmp_path / "out") as tmp:
        (tmp / "model.json").write_text("half")
        raise RuntimeError("parity check failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["old.txt"]
    with atomic_output_dir(tmp_path / "out") as tmp:
        (tmp / "model.json").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["model.json"]


def test_cli_runs_as_a_script_from_anywhere(tmp_path):
    for command in ([str(ROOT / "tools" / "export.py")], ["-m", "tools.gallery", "build"]):
        result = subprocess.run([sys.executable, *command, "--help"], cwd=tmp_path if command[0] != "-m" else ROOT,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and "usage:" in result.stdout, result.stderr
