"""The checks of tools/selfcheck.py on the data loader and the exported models (Paddle Inference, TensorRT,
ONNX Runtime)."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import numpy as np
import paddle

from deploy.embedder import OnnxEmbedder, PaddleInferenceEmbedder, onnx_gpu_missing, tensorrt_missing
from tools.selfcheck_model import (
    COSINE_AMP,
    DIM,
    GPU_TOLERANCE,
    LOADER_FLOOR,
    NETWORK,
    WIDTH,
    Failed,
    Machine,
    Skip,
    small_model,
)


def _importable(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


def check_data(m: Machine) -> str:
    """The training loader's images/s (1 worker) against a single core decoding the same JPEGs (bench/loader.py)."""
    from bench.loader import cv2_imdecode, decode_rate, loader_rate
    from dataset import RecordIODataset
    from synthetic import ensure_synthetic

    identities = 40 if m.quick else 200
    with contextlib.redirect_stderr(io.StringIO()):  # its progress bar
        root = ensure_synthetic(m.work / "cache", identities, 16, 20, seed=0)
    ds = RecordIODataset(root, train=True, seed=0)
    payloads = [bytes(p) for p in ds.raw_payloads(np.arange(len(ds)))]
    decode_rate(payloads[:64], cv2_imdecode)  # warm-up
    ceiling = decode_rate(payloads, cv2_imdecode)[0]
    one = loader_rate(ds, 32, 1, 0)[0]
    ratio = one / ceiling
    if not ratio >= LOADER_FLOOR:
        raise Failed(f"1 worker gives {one:.0f} images/s, {ratio:.2f} of the {ceiling:.0f} images/s decode ceiling "
                     f"(< {LOADER_FLOOR}; expected ~0.9 on an idle core)")
    figure = f"1 worker {one:.0f} img/s = {ratio:.2f} x decode ceiling {ceiling:.0f} img/s"
    if not m.quick and (os.cpu_count() or 1) > 1:
        figure += f"; 2 workers {loader_rate(ds, 32, 2, 2)[0]:.0f} img/s"
    return figure


def check_export(m: Machine) -> str:
    """tools/export.py on the small net: Paddle Inference (CPU) and ONNX Runtime match dygraph (export's own check)."""
    from tools.export import export

    weights = m.work / "backbone.pdparams"
    paddle.save(small_model().state_dict(), str(weights))
    have_onnx = all(_importable(name) for name in ("paddle2onnx", "onnxruntime"))
    formats = ("paddle", "onnx") if have_onnx else ("paddle",)
    meta = export(NETWORK, weights, m.work / "exported", formats, width=WIDTH, embedding_size=DIM)
    m.shared["exported"] = m.work / "exported"
    figure = ", ".join(f"{k} {v:.1e}" for k, v in meta["parity_max_abs_diff"].items())
    missing = "" if have_onnx else " (onnx skipped: paddle2onnx or onnxruntime is not installed)"
    return f"max |diff| vs dygraph: {figure}{missing}"


def _exported_reference(m: Machine) -> tuple[Path, np.ndarray, np.ndarray]:
    """The check_export model directory, a batch of images and the dygraph embeddings of them (on the CPU)."""
    exported = m.shared.get("exported")
    if exported is None:
        raise Skip("needs the export check's model (it failed or did not run)")
    images = np.random.default_rng(2).integers(0, 255, (4, 112, 112, 3), dtype=np.uint8)
    expected = PaddleInferenceEmbedder(exported, onednn=False).embed(images)
    return exported, images, expected


def _cosine_min(a: np.ndarray, b: np.ndarray) -> float:
    return float((np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())


def check_export_gpu(m: Machine) -> str:
    """Paddle Inference on CUDA agrees with the CPU predictor."""
    m.need_gpu("Paddle Inference on CUDA")
    exported, images, expected = _exported_reference(m)
    got = PaddleInferenceEmbedder(exported, device="gpu").embed(images)
    diff = float(np.abs(got - expected).max() / np.abs(expected).max())
    if not diff <= GPU_TOLERANCE:
        raise Failed(f"GPU predictor differs from the CPU one by {diff:.2e} (relative)")
    return f"max rel diff vs CPU {diff:.1e}"


def check_export_tensorrt(m: Machine) -> str:
    """A TensorRT fp16 engine agrees with the CPU predictor (cosine per sample)."""
    m.need_gpu("TensorRT")
    missing = tensorrt_missing()
    if missing:
        raise Skip(missing)
    exported, images, expected = _exported_reference(m)
    cosine = _cosine_min(PaddleInferenceEmbedder(exported, device="gpu", tensorrt=True).embed(images), expected)
    if not cosine > COSINE_AMP:
        raise Failed(f"TensorRT fp16 embeddings: min cosine {cosine:.5f} <= {COSINE_AMP}")
    return f"min cosine vs CPU fp32 {cosine:.5f}"


def check_export_onnx_cuda(m: Machine) -> str:
    """ONNX Runtime's CUDA provider agrees with the CPU predictor."""
    if not _importable("onnxruntime"):
        raise Skip("onnxruntime is not installed")
    missing = onnx_gpu_missing()
    if missing:
        raise Skip(missing)
    exported, images, expected = _exported_reference(m)
    if not (exported / "model.onnx").is_file():
        raise Skip("the export check wrote no model.onnx")
    got = OnnxEmbedder(exported / "model.onnx", device="gpu").embed(images)
    diff = float(np.abs(got - expected).max() / np.abs(expected).max())
    if not diff <= GPU_TOLERANCE:
        raise Failed(f"ONNX Runtime CUDA differs from the CPU predictor by {diff:.2e} (relative)")
    return f"max rel diff vs CPU {diff:.1e}"
