"""`--device gpu` and `--tensorrt` of the inference tools: a missing piece is one line; the checks behind it."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import paddle
import pytest

from backbones import get_model
from deploy import embedder
from deploy.embedder import DeviceError, require_device
from tools import gallery, inference, recognize

NO_GPU = embedder.gpu_missing()


@pytest.fixture
def inputs(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A face folder, tiny weights, and a stand-in model.onnx (the device is checked before the file is read)."""
    faces = tmp_path / "faces"
    faces.mkdir()
    cv2.imwrite(str(faces / "a.png"), np.zeros((112, 112, 3), np.uint8))
    weights = tmp_path / "mbf.pdparams"
    paddle.save(get_model("mbf", width=0.25, num_features=16).state_dict(), str(weights))
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"")
    return faces, weights, onnx


@pytest.mark.skipif(NO_GPU is None, reason="this machine has a GPU")
@pytest.mark.parametrize(("model_args", "device_args", "message"), [
    (["--network", "mbf", "--width", "0.25", "--embedding-size", "16", "--weights", "{weights}"], ["--device", "gpu"],
     f"error: --device gpu: {NO_GPU}"),
    (["--model", "{onnx}"], ["--device", "gpu"], "error: --device gpu: onnxruntime "),
    (["--model", "{onnx}"], ["--device", "gpu", "--tensorrt"], "error: --tensorrt is a Paddle Inference engine"),
    (["--network", "mbf", "--weights", "{weights}"], ["--tensorrt"], "error: --tensorrt needs an exported model"),
])
def test_gpu_options_on_a_cpu_machine_say_what_is_missing(inputs: tuple[Path, Path, Path], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture, model_args: list[str],
                                                         device_args: list[str], message: str) -> None:
    faces, weights, onnx = inputs
    args = [a.format(weights=weights, onnx=onnx) for a in model_args]
    out = tmp_path / "emb"
    assert inference.main(["--input", str(faces), "--output", str(out), *args, *device_args]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message), err
    assert not list(tmp_path.glob("emb*"))  # nothing written


def test_require_device_names_the_missing_piece(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedder, "gpu_missing", lambda: "no GPU here")
    with pytest.raises(DeviceError, match=r"^--device gpu: no GPU here$"):
        require_device("gpu")
    monkeypatch.setattr(embedder, "gpu_missing", lambda: None)
    monkeypatch.setattr(embedder, "tensorrt_missing", lambda: "no TensorRT in this build")
    require_device("gpu")  # a GPU is enough without TensorRT
    with pytest.raises(DeviceError, match=r"^--device gpu --tensorrt: no TensorRT in this build$"):
        require_device("gpu", tensorrt=True)
    with pytest.raises(DeviceError, match="add --device gpu"):
        require_device("cpu", tensorrt=True)
    with pytest.raises(DeviceError, match="--device must be one of cpu, gpu"):
        require_device("tpu")


@pytest.mark.parametrize("tool_argv", [(inference.main, []), (gallery.main, ["build"]), (gallery.main, ["search"]),
                                       (recognize.main, [])])
def test_every_inference_tool_takes_the_device_options(tool_argv: tuple, capsys: pytest.CaptureFixture) -> None:
    tool, argv = tool_argv
    with pytest.raises(SystemExit):
        tool([*argv, "--help"])
    text = capsys.readouterr().out
    assert "--device {cpu,gpu}" in text and "--tensorrt" in text
