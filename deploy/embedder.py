"""One way to turn aligned face crops into embeddings, whatever runs the network.

Three backends share the same preprocessing (`utils.image.preprocess_batch`), batching and input checks, so the
dynamic-graph model, the exported Paddle Inference model and the ONNX model can be swapped without the numbers
drifting apart: `DygraphEmbedder` (network + .pdparams), `PaddleInferenceEmbedder` (model.json + model.pdiparams
from `tools/export.py`), `OnnxEmbedder` (model.onnx). `load_embedder` picks one from a path; `add_model_args` /
`embedder_from_args` give every tool the same command-line options. `device="gpu"` runs Paddle Inference on CUDA
(optionally through a TensorRT fp16 engine), ONNX Runtime with its CUDA provider, or the dygraph model on the GPU;
where that is not possible it fails with one line saying what is missing (`gpu_missing`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from utils.cli import positive_float, positive_int
from utils.image import INPUT_SIZE, preprocess_batch

META_NAME = "meta.json"
PADDLE_MODEL = "model.json"
PADDLE_PARAMS = "model.pdiparams"
ONNX_MODEL = "model.onnx"
PREPROCESSING = "RGB, 112x112 crop aligned to the ArcFace 5-point template, (x/255 - 0.5)/0.5, NCHW float32"


def file_sha256(path: str | Path) -> str:
    """Checksum of a weights file, recorded in export metadata so an exported model names its source."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_backbone(network: str, weights: str | Path, width: float = 1.0, embedding_size: int = 512):
    """Build `backbones.get_model(network)` in eval mode with `weights` (.pdparams), loaded whole or not at all."""
    import backbones

    model = backbones.get_model(network, num_features=embedding_size, width=width)
    backbones.load_weights(model, weights, f"{network} (width {width}, embedding {embedding_size})")
    model.eval()
    return model


class Embedder:
    """Batch embedding of aligned RGB crops. Subclasses implement `_run` on one preprocessed NCHW batch.

    `fixed_batch` is the batch size an exported model was frozen to (None = any): `embed` pads the last chunk
    to it, and `forward` refuses any other batch with a clear error.
    """

    backend = "?"

    def __init__(self, embedding_size: int, fixed_batch: int | None = None, meta: dict[str, Any] | None = None):
        self.embedding_size = embedding_size
        self.fixed_batch = fixed_batch
        self.meta = meta or {}

    def forward(self, batch: np.ndarray) -> np.ndarray:
        """Preprocessed Nx3x112x112 float32 -> NxD float32 embeddings (not normalised)."""
        expected = (3, INPUT_SIZE, INPUT_SIZE)
        if batch.ndim != 4 or tuple(batch.shape[1:]) != expected:
            raise ValueError(f"{self.backend} model expects input [N, 3, {INPUT_SIZE}, {INPUT_SIZE}], "
                             f"got {list(batch.shape)}")
        if self.fixed_batch is not None and batch.shape[0] != self.fixed_batch:
            raise ValueError(f"{self.backend} model was exported for a fixed batch of {self.fixed_batch}, "
                             f"got a batch of {batch.shape[0]} (export with --batch-size dynamic)")
        out = np.asarray(self._run(np.ascontiguousarray(batch, dtype=np.float32)), dtype=np.float32)
        if out.shape != (batch.shape[0], self.embedding_size):
            raise ValueError(f"{self.backend} model returned {list(out.shape)}, "
                             f"expected [{batch.shape[0]}, {self.embedding_size}]")
        return out

    def embed(self, images: np.ndarray, batch_size: int = 64, flip: bool = False) -> np.ndarray:
        """NxHxWx3 uint8 RGB aligned crops -> NxD float32 embeddings.

        `flip=True` adds the embedding of the mirrored image (the verification protocol's flip test).
        """
        if images.ndim != 4 or images.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
            raise ValueError(f"expected aligned {INPUT_SIZE}x{INPUT_SIZE} RGB crops, got images of shape "
                             f"{list(images.shape)} (align full images with their 5 landmarks first)")
        step = self.fixed_batch or batch_size
        out = np.empty((len(images), self.embedding_size), dtype=np.float32)
        for start in range(0, len(images), step):
            chunk = images[start:start + step]
            n = len(chunk)
            if self.fixed_batch is not None and n < step:  # pad the tail to the frozen batch size
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], step - n, axis=0)])
            emb = self.forward(preprocess_batch(chunk))
            if flip:
                emb = emb + self.forward(preprocess_batch(chunk, flip=True))
            out[start:start + n] = emb[:n]
        return out

    def _run(self, batch: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class DygraphEmbedder(Embedder):
    """A Paddle `nn.Layer` in eval mode (no export needed; the reference the exported models are checked against)."""

    backend = "dygraph"

    def __init__(self, model, embedding_size: int, meta: dict[str, Any] | None = None):
        super().__init__(embedding_size, None, meta)
        self.model = model

    def _run(self, batch: np.ndarray) -> np.ndarray:
        import paddle

        with paddle.no_grad():
            return self.model(paddle.to_tensor(batch)).numpy()


class PaddleInferenceEmbedder(Embedder):
    """`paddle.inference` predictor on an exported model.json/model.pdiparams (CPU: oneDNN on by default; GPU: CUDA,
    or with `tensorrt` a TensorRT fp16 engine built from the model into a temporary directory)."""

    backend = "paddle"

    def __init__(self, model_dir: str | Path, threads: int | None = None, onednn: bool = True, device: str = "cpu",
                 tensorrt: bool = False):
        from paddle import inference

        model_dir = Path(model_dir)
        meta = read_meta(model_dir)
        require_device(device, tensorrt)
        self._trt_dir = tempfile.TemporaryDirectory(prefix="arcface_trt_") if tensorrt else None
        model_file, params_file = model_dir / PADDLE_MODEL, model_dir / PADDLE_PARAMS
        if self._trt_dir is not None:
            model_file, params_file = _tensorrt_fp16(model_dir, meta, Path(self._trt_dir.name))
        config = inference.Config(str(model_file), str(params_file))
        config.disable_glog_info()
        if device == "gpu":
            config.enable_use_gpu(256, 0)  # initial memory pool (MB), GPU 0
        elif onednn:
            config.enable_onednn()
        else:
            config.disable_onednn()
        config.set_cpu_math_library_num_threads(threads or default_threads())
        self.backend = "paddle-trt-fp16" if tensorrt else "paddle-gpu" if device == "gpu" else "paddle"
        self.predictor = inference.create_predictor(config)
        self._input = self.predictor.get_input_handle(self.predictor.get_input_names()[0])
        self._output = self.predictor.get_output_handle(self.predictor.get_output_names()[0])
        super().__init__(int(meta["embedding_size"]), meta.get("batch_size"), meta)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        self._input.reshape(list(batch.shape))
        self._input.copy_from_cpu(batch)
        self.predictor.run()
        return self._output.copy_to_cpu()


class OnnxEmbedder(Embedder):
    """ONNX Runtime (CPU provider, or CUDA on `device="gpu"`) on an exported model.onnx; shapes from the graph."""

    backend = "onnx"

    def __init__(self, onnx_path: str | Path, threads: int | None = None, device: str = "cpu"):
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        if device == "gpu":
            missing = onnx_gpu_missing()
            if missing:
                raise DeviceError(f"--device gpu: {missing}")
            providers = ["CUDAExecutionProvider"]
            self.backend = "onnx-cuda"
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or default_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(onnx_path), options, providers=providers)
        inp, out = self.session.get_inputs()[0], self.session.get_outputs()[0]
        self._input_name = inp.name
        batch = inp.shape[0] if isinstance(inp.shape[0], int) else None
        dim = out.shape[-1]
        if not isinstance(dim, int):
            raise ValueError(f"{onnx_path}: output embedding size is not fixed in the graph ({out.shape})")
        meta_path = Path(onnx_path).with_name(META_NAME)
        super().__init__(dim, batch, read_meta(meta_path.parent) if meta_path.is_file() else {})

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self._input_name: batch})[0]


def default_threads() -> int:
    """Threads for an inference backend: OMP_NUM_THREADS as the user set it, else all cores.

    `import paddle` sets OMP_NUM_THREADS=1 when it is unset, so a program resolves this before Paddle is imported
    (embedder_from_args does, in main()) and passes the number on.
    """
    return int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)


DEVICES = ("cpu", "gpu")
TRT_MAX_BATCH = 64  # the largest batch a TensorRT engine of a dynamic-batch export is built for


class DeviceError(ValueError):
    """The requested device or engine cannot run here; the message says what is missing."""


def gpu_missing() -> str | None:
    """Why Paddle cannot compute on a GPU here (the build, or no visible device); None when it can."""
    import paddle

    if not paddle.device.is_compiled_with_cuda():
        return f"this Paddle {paddle.__version__} is the CPU build (install paddlepaddle-gpu {paddle.__version__})"
    if paddle.device.cuda.device_count() == 0:
        return "Paddle was built with CUDA but sees no GPU (check nvidia-smi and CUDA_VISIBLE_DEVICES)"
    return None


def tensorrt_missing() -> str | None:
    """Why Paddle Inference cannot build a TensorRT engine here; None when it can."""
    from paddle import inference

    if not any(inference.get_trt_compile_version()):
        return "this Paddle build has no TensorRT (a paddlepaddle-gpu wheel built with TensorRT is needed)"
    if not any(inference.get_trt_runtime_version()):
        return "Paddle was built with TensorRT but cannot load its libraries (install TensorRT, set LD_LIBRARY_PATH)"
    return None


def onnx_gpu_missing() -> str | None:
    """Why ONNX Runtime cannot run on a GPU here; None when its CUDA provider is available."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (install onnxruntime-gpu in its place)"
    return None


def require_device(device: str, tensorrt: bool = False) -> None:
    """Raise DeviceError (one line) unless `device` (and a TensorRT engine, if asked for) can run here."""
    if device not in DEVICES:
        raise DeviceError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    if tensorrt and device != "gpu":
        raise DeviceError("--tensorrt runs on the GPU: add --device gpu")
    missing = gpu_missing() if device == "gpu" else None
    if missing is None and tensorrt:
        missing = tensorrt_missing()
    if missing:
        raise DeviceError(f"--device gpu{' --tensorrt' if tensorrt else ''}: {missing}")


def _tensorrt_fp16(model_dir: Path, meta: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Paddle's PIR-TensorRT conversion of an exported model to an fp16 engine program; (model, params) files."""
    from paddle.tensorrt.export import Input, PrecisionMode, TensorRTConfig, convert

    batch = meta.get("batch_size")
    shape = [1, 3, INPUT_SIZE, INPUT_SIZE]
    spec = Input(min_input_shape=[batch or 1, *shape[1:]], optim_input_shape=[batch or 8, *shape[1:]],
                 max_input_shape=[batch or TRT_MAX_BATCH, *shape[1:]], name=meta.get("input_name", "input"))
    config = TensorRTConfig(inputs=[spec], precision_mode=PrecisionMode.FP16, save_model_dir=str(out_dir / "model"))
    convert(str(model_dir / Path(PADDLE_MODEL).stem), config)
    return out_dir / "model.json", out_dir / "model.pdiparams"


def read_meta(model_dir: str | Path) -> dict[str, Any]:
    """The meta.json `tools/export.py` writes beside an exported model."""
    path = Path(model_dir) / META_NAME
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing; export the model with tools/export.py") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or "embedding_size" not in meta:
        raise ValueError(f"{path}: no 'embedding_size' entry; not written by tools/export.py")
    return meta


def load_embedder(model: str | Path | None = None, *, network: str | None = None, weights: str | Path | None = None,
                  width: float = 1.0, embedding_size: int = 512, backend: str = "auto", threads: int | None = None,
                  onednn: bool = True, device: str = "cpu", tensorrt: bool = False) -> Embedder:
    """An exported model (directory, model.json or model.onnx) or `network` + `weights` (.pdparams, dygraph).

    For a directory holding both formats, `backend="auto"` picks Paddle Inference; `"onnx"` the ONNX file.
    `device="gpu"` runs it on GPU 0; `tensorrt` (Paddle Inference only) through a TensorRT fp16 engine.
    """
    if weights is not None:
        if network is None:
            raise ValueError("--weights needs --network (e.g. --network r50)")
        if tensorrt:
            raise DeviceError("--tensorrt needs an exported model (--model DIR), not --weights")
        require_device(device)
        if device == "gpu":
            import paddle

            paddle.set_device("gpu")
        net = load_backbone(network, weights, width, embedding_size)
        meta = {"network": network, "width": width, "embedding_size": embedding_size,
                "source": {"file": Path(weights).name, "sha256": file_sha256(weights)}}
        return DygraphEmbedder(net, embedding_size, meta)
    if model is None:
        raise ValueError("give an exported model (--model DIR) or --network with --weights")
    path = Path(model)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such model")
    if path.is_dir():
        has_paddle, has_onnx = (path / PADDLE_MODEL).is_file(), (path / ONNX_MODEL).is_file()
        if backend == "onnx" or (backend == "auto" and has_onnx and not has_paddle):
            if not has_onnx:
                raise FileNotFoundError(f"{path / ONNX_MODEL}: missing (export with --format onnx or both)")
            return _onnx(path / ONNX_MODEL, threads, device, tensorrt)
        if not has_paddle:
            raise FileNotFoundError(f"{path / PADDLE_MODEL}: missing (export with --format paddle or both)")
        return PaddleInferenceEmbedder(path, threads, onednn, device, tensorrt)
    if path.suffix == ".onnx":
        return _onnx(path, threads, device, tensorrt)
    if path.name == PADDLE_MODEL:
        return PaddleInferenceEmbedder(path.parent, threads, onednn, device, tensorrt)
    raise ValueError(f"{path}: not an exported model (a directory, model.json or .onnx); "
                     "for a .pdparams use --network and --weights")


def _onnx(path: Path, threads: int | None, device: str, tensorrt: bool) -> OnnxEmbedder:
    if tensorrt:
        raise DeviceError("--tensorrt is a Paddle Inference engine: use --backend paddle (model.json)")
    return OnnxEmbedder(path, threads, device)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The model options every runner shares (inference, gallery, recognize)."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", help="exported model: a tools/export.py directory, its model.json or model.onnx")
    group.add_argument("--weights", help="a .pdparams backbone state dict (dygraph; needs --network)")
    group.add_argument("--network", help="backbone name for --weights (r18, r34, r50, r100, r200, mbf, mbf_large)")
    group.add_argument("--width", type=positive_float, default=1.0, help="channel-width multiplier for --weights")
    group.add_argument("--embedding-size", type=positive_int, default=512, help="embedding size for --weights")
    group.add_argument("--backend", choices=["auto", "paddle", "onnx"], default="auto",
                       help="which file of an export directory to run (auto: Paddle Inference if present)")
    group.add_argument("--threads", type=positive_int, default=None,
                       help="CPU threads (default: OMP_NUM_THREADS or all)")
    group.add_argument("--no-onednn", action="store_true", help="run Paddle Inference without oneDNN")
    group.add_argument("--device", choices=DEVICES, default="cpu",
                       help="gpu: Paddle Inference on CUDA, ONNX Runtime's CUDA provider, or dygraph on the GPU")
    group.add_argument("--tensorrt", action="store_true",
                       help="with --device gpu: Paddle Inference through a TensorRT fp16 engine")
    group.add_argument("--batch-size", type=positive_int, default=64, help="images per forward pass")
    group.add_argument("--flip", action="store_true", help="add the embedding of the mirrored crop")


def embedder_from_args(args: argparse.Namespace) -> Embedder:
    """`load_embedder` from the options `add_model_args` declared."""
    if (args.model is None) == (args.weights is None):
        raise ValueError("give exactly one of --model (exported) or --weights (with --network)")
    threads = args.threads or default_threads()  # before paddle is imported (below, on first use)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))  # dygraph reads its thread count at that import
    return load_embedder(args.model, network=args.network, weights=args.weights, width=args.width,
                         embedding_size=args.embedding_size, backend=args.backend, threads=threads,
                         onednn=not args.no_onednn, device=args.device, tensorrt=args.tensorrt)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (cosine similarity becomes a dot product)."""
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, 1e-12)
