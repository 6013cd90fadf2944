"""Check this machine before training: the devices, and each part of the project that can run here.

    python tools/selfcheck.py                  # about a minute; prints a table, exit status 1 if any check fails
    python tools/selfcheck.py --quick          # smaller and fewer repeats (CI, under 30 s on 2 idle cores)
    python tools/selfcheck.py --json selfcheck.json --only head,train

Each check passes, fails (with what differed) or is skipped (with why: e.g. no GPU). On a GPU machine the GPU-only
code runs here first: AMP fp16, NHWC and to_static on cuDNN, the fused Partial FC kernels, NCCL across 2 GPUs,
Paddle Inference on CUDA/TensorRT and ONNX Runtime's CUDA provider. docs/gpu_first_run.md explains each check,
what a failure means and what to send in a bug report.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a script: make the project root importable
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("GLOG_minloglevel", "2")
warnings.filterwarnings("ignore", message="No ccache found")
warnings.filterwarnings("ignore", message="Tensor do not have 'place'")

import numpy as np
import paddle

from backbones import get_model, load_weights
from backbones.layers import PReLU
from deploy.embedder import OnnxEmbedder, PaddleInferenceEmbedder, gpu_missing, onnx_gpu_missing, tensorrt_missing
from losses import CombinedMarginLoss
from partial_fc import PartialFC
from utils.atomic import write_text_atomic
from utils.cli import check_writable

NETWORK, WIDTH, DIM = "r18", 0.25, 32  # the small net of the backbone, head and multi-GPU checks
COSINE_AMP = 0.999    # fp32 vs AMP fp16 embeddings (per sample)
CPU_TOLERANCE = 1e-5  # relative, layouts / compilation / backends on the CPU
GPU_TOLERANCE = 1e-3  # on GPUs, cuDNN picks different algorithms per layout and may use TF32
LOADER_FLOOR = 0.5    # the loader with one worker below half the single-core decode rate is broken
DIST_CLASSES, DIST_BATCH = 40, 16  # the 2-rank check's global batch; each rank takes half


class Skip(Exception):
    """The check cannot run on this machine; the message says why."""


class Failed(Exception):
    """The check ran and a result was wrong; the message says what."""


@dataclass
class Machine:
    quick: bool
    work: Path
    gpus: int
    gpu_reason: str | None  # why there is no GPU (None: there is one)
    shared: dict[str, Any] = field(default_factory=dict)  # what one check leaves for later ones

    @property
    def device(self) -> str:
        return "gpu" if self.gpus else "cpu"

    @property
    def tolerance(self) -> float:
        return GPU_TOLERANCE if self.gpus else CPU_TOLERANCE

    def need_gpu(self, what: str) -> None:
        if not self.gpus:
            raise Skip(f"{what}: {self.gpu_reason}")


def environment() -> dict[str, Any]:
    """What this machine and its Paddle build are, for the report and for bug reports."""
    from paddle import inference

    cuda = paddle.device.is_compiled_with_cuda()
    gpus = paddle.device.cuda.device_count() if cuda else 0
    env = {
        "python": platform.python_version(), "platform": platform.platform(), "cpu": _cpu_model(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "paddle": paddle.__version__, "paddle_commit": paddle.version.commit, "paddle_cuda_build": cuda,
        "cuda": paddle.version.cuda() if cuda else None, "cudnn": paddle.version.cudnn() if cuda else None,
        "tensorrt": ".".join(map(str, inference.get_trt_compile_version())) if cuda else None,
        "gpus": gpus, "gpu_names": [paddle.device.cuda.get_device_name(i) for i in range(gpus)],
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    for module in ("onnxruntime", "paddle2onnx", "cv2", "numpy"):
        try:
            env[module] = __import__(module).__version__
        except ImportError:
            env[module] = None
    return env


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


# ---------------------------------------------------------------------------------------------------------- checks
def _small_model(**kwargs: Any) -> paddle.nn.Layer:
    """The small net with every tensor informative: random PReLU slopes and BatchNorm shifts (a layout or channel
    mix-up must show), and BatchNorm statistics of one random batch (activations stay O(1), as in a trained model,
    so that fp16 does not overflow and differences are measured at a realistic scale). Returned in train mode."""
    paddle.seed(0)
    model = get_model(NETWORK, num_features=DIM, width=WIDTH, **kwargs)
    rng = np.random.default_rng(0)
    norms = [layer for layer in model.sublayers() if isinstance(layer, paddle.nn.layer.norm._BatchNormBase)]
    for layer in model.sublayers():
        if isinstance(layer, PReLU):
            layer.weight.set_value(rng.uniform(0.0, 0.5, layer.weight.shape).astype(np.float32))
    for layer in norms:
        layer.bias.set_value(rng.normal(0.0, 0.1, layer.bias.shape).astype(np.float32))
    momenta = [layer._momentum for layer in norms]
    for layer in norms:
        layer._momentum = 0.0
    model.train()
    with paddle.no_grad():
        model(paddle.to_tensor(rng.standard_normal((8, 3, 112, 112)).astype(np.float32)))
    for layer, momentum in zip(norms, momenta, strict=True):
        layer._momentum = momentum
    return model


def _batch(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 3, 112, 112)).astype(np.float32), rng.standard_normal((n, DIM)).astype(np.float32)


def _forward_backward(model: paddle.nn.Layer, x: np.ndarray, projection: np.ndarray) -> dict[str, np.ndarray]:
    out = model(paddle.to_tensor(x))
    (out.astype("float32") * paddle.to_tensor(projection)).sum().backward()
    result = {"out": out.astype("float32").numpy()}
    result.update({k: p.grad.astype("float32").numpy() for k, p in model.named_parameters() if p.grad is not None})
    model.clear_gradients()
    return result


def _relative(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """max |a - b| over every array, relative to the largest |a| of each kind (output, gradients)."""
    worst = 0.0
    for keys in (["out"], [k for k in a if k != "out"]):
        scale = max(float(np.abs(a[k]).max()) for k in keys) or 1.0
        worst = max(worst, max(float(np.abs(a[k] - b[k]).max()) for k in keys) / scale)
    return worst


def _step_ms(model: paddle.nn.Layer, x: np.ndarray, projection: np.ndarray, repeats: int) -> float:
    """Median forward + backward time of a training step."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _forward_backward(model, x, projection)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def check_backbone(m: Machine) -> str:
    """Forward and backward of a small iresnet on the training device: finite, and every parameter gets a gradient."""
    model = _small_model()
    model.train()
    x, projection = _batch(8)
    result = _forward_backward(model, x, projection)  # warm-up (kernel selection)
    trainable = [k for k, p in model.named_parameters() if not p.stop_gradient]
    missing = sorted(set(trainable) - set(result))
    if missing:
        raise Failed(f"no gradient for {len(missing)} parameters, e.g. {missing[0]}")
    if not all(np.isfinite(v).all() for v in result.values()):
        raise Failed("non-finite output or gradient")
    ms = _step_ms(model, x, projection, 1 if m.quick else 5)
    return f"{NETWORK} width {WIDTH} batch 8 on {m.device}: fwd+bwd {ms:.0f} ms, {len(trainable)} gradients finite"


def check_backbone_nhwc(m: Machine) -> str:
    """NHWC holds the NCHW weights and gives the same embeddings and gradients (eval mode: no batch statistics)."""
    nchw, nhwc = _small_model(), _small_model(data_format="NHWC")
    nhwc.set_state_dict(nchw.state_dict())
    for model in (nchw, nhwc):
        model.eval()
    x, projection = _batch(4)
    diff = _relative(_forward_backward(nchw, x, projection), _forward_backward(nhwc, x, projection))
    if not diff <= m.tolerance:
        raise Failed(f"NHWC differs from NCHW by {diff:.2e} (relative) > {m.tolerance:g}")
    nchw.train()
    nhwc.train()
    repeats = 1 if m.quick else 5
    t_nchw, t_nhwc = _step_ms(nchw, x, projection, repeats), _step_ms(nhwc, x, projection, repeats)
    return f"max rel diff {diff:.1e}; train step NHWC {t_nhwc:.0f} ms vs NCHW {t_nchw:.0f} ms ({t_nhwc / t_nchw:.2f}x)"


def check_backbone_to_static(m: Machine) -> str:
    """The to_static-compiled forward/backward equals dygraph (both with F.prelu) in training mode; its step time."""
    previous = PReLU.numpy_on_cpu
    PReLU.numpy_on_cpu = False  # the NumPy PReLU is dygraph-only: compare like with like
    try:
        dygraph, compiled = _small_model(), _small_model()
        compiled.set_state_dict(dygraph.state_dict())
        compiled = paddle.jit.to_static(compiled, full_graph=True)
        x, projection = _batch(8)
        start = time.perf_counter()
        got = _forward_backward(compiled, x, projection)
        compile_s = time.perf_counter() - start
        diff = _relative(_forward_backward(dygraph, x, projection), got)
        if not diff <= m.tolerance:
            raise Failed(f"to_static differs from dygraph by {diff:.2e} (relative) > {m.tolerance:g}")
        repeats = 1 if m.quick else 5
        t_dy, t_static = _step_ms(dygraph, x, projection, repeats), _step_ms(compiled, x, projection, repeats)
    finally:
        PReLU.numpy_on_cpu = previous
    return (f"max rel diff {diff:.1e}; step {t_static:.0f} ms vs dygraph {t_dy:.0f} ms ({t_static / t_dy:.2f}x), "
            f"compile {compile_s:.1f} s")


def check_backbone_amp(m: Machine) -> str:
    """AMP fp16 embeddings agree with fp32 (cosine per sample), in NCHW, NHWC and to_static."""
    m.need_gpu("AMP fp16 runs on GPUs only (Paddle has no fp16 CPU kernels for these networks)")
    reference = _small_model()
    reference.eval()
    x = paddle.to_tensor(_batch(8)[0])
    with paddle.no_grad():
        expected = reference(x).numpy()
    cosines = {}
    for label, kwargs, compile_ in (("NCHW", {}, False), ("NHWC", {"data_format": "NHWC"}, False),
                                    ("to_static", {}, True)):
        model = _small_model(fp16=True, **kwargs)
        model.set_state_dict(reference.state_dict())
        model.eval()
        if compile_:
            model = paddle.jit.to_static(model, full_graph=True)
        with paddle.no_grad():
            got = model(x).astype("float32").numpy()
        cos = np.sum(got * expected, 1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1))
        cosines[label] = float(cos.min())
    bad = {k: v for k, v in cosines.items() if not v > COSINE_AMP}
    if bad:
        raise Failed(f"fp16 embeddings disagree with fp32: min cosine {bad} <= {COSINE_AMP}")
    return "min cosine fp16 vs fp32: " + ", ".join(f"{k} {v:.5f}" for k, v in cosines.items())


def _head_step(pfc: PartialFC, emb: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    x = paddle.to_tensor(emb, stop_gradient=False)
    loss = pfc(x, paddle.to_tensor(labels))
    loss.backward()
    rows, grad = pfc.pending_gradient()
    result = {"loss": np.array([float(loss)]), "embedding_grad": x.grad.numpy(), "rows": np.asarray(rows, float),
              "centre_grad": np.asarray(grad)}
    pfc.step(0.1)
    result["centres"] = np.asarray(pfc.state_dict()["weight"])
    return result


def _head_inputs(classes: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    return rng.standard_normal((batch, DIM)).astype(np.float32), rng.integers(0, classes, batch).astype(np.int64)


def _worst(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> tuple[str, float]:
    diffs = {k: float(np.abs(a[k] - b[k]).max() / (np.abs(a[k]).max() or 1.0)) for k in a}
    key = max(diffs, key=diffs.get)
    return key, diffs[key]


def check_head(m: Machine) -> str:
    """Partial FC's paddle backend (on the training device) equals its NumPy backend: loss, gradients, one SGD step."""
    emb, labels = _head_inputs(400, 32)
    margin = CombinedMarginLoss(64.0, 1.0, 0.5, 0.0)
    results = [_head_step(PartialFC(margin, DIM, 400, sample_rate=0.5, seed=7, backend=b), emb, labels)
               for b in ("numpy", "paddle")]
    if results[0]["rows"].shape != results[1]["rows"].shape or (results[0]["rows"] != results[1]["rows"]).any():
        raise Failed("the two backends sampled different classes")
    key, diff = _worst(*results)
    if not diff <= CPU_TOLERANCE * 10:
        raise Failed(f"paddle backend differs from numpy in {key} by {diff:.2e} (relative)")
    return f"400 classes, sample_rate 0.5, batch 32: max rel diff {diff:.1e} ({key})"


def check_head_fused(m: Machine) -> str:
    """Paddle's fused margin_cross_entropy kernel equals the portable paddle path."""
    m.need_gpu("margin_cross_entropy has no CPU kernel")
    emb, labels = _head_inputs(400, 32)
    margin = CombinedMarginLoss(64.0, 1.0, 0.5, 0.0)
    results = [_head_step(PartialFC(margin, DIM, 400, seed=7, backend="paddle", kernel=k), emb, labels)
               for k in ("portable", "fused")]
    key, diff = _worst(*results)
    if not diff <= GPU_TOLERANCE:
        raise Failed(f"fused kernel differs from portable in {key} by {diff:.2e} (relative)")
    return f"400 classes, batch 32: max rel diff {diff:.1e} ({key})"


def check_train(m: Machine) -> str:
    """train.py itself for 20 steps on a tiny synthetic set: the loss falls; step time and peak memory."""
    import train

    run, steps = m.work / "train", 20
    argv = ["--cache_dir", str(m.work / "cache"), "--synthetic_identities", "20", "--synthetic_images_per_id", "2",
            "--synthetic_val_pairs", "20", "--network", "mbf", "--width", "0.25", "--embedding_size", "64",
            "--batch_size", "8", "--num_epoch", "4", "--lr", "0.1", "--log_every", "1", "--val_targets", "",
            "--val_at_start", "false", "--num_workers", "0" if m.quick else "1", "--stop_at_step", str(steps),
            "--output", str(run.parent), "--run_name", run.name, "--fp16", "true" if m.gpus else "false"]
    if m.gpus:
        paddle.device.cuda.reset_max_memory_allocated()
    output = io.StringIO()  # train.py's console log and progress bars; its last lines explain a failure
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        status = train.main(argv)
    if status != 0:
        raise Failed(f"train.py exited with status {status}: {output.getvalue().strip()[-300:]}")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    step_ms = statistics.median(r["step_time"] for r in records[2:] if "step_time" in r) * 1e3
    memory = (f"peak GPU memory {paddle.device.cuda.max_memory_allocated() / 2**20:.0f} MB" if m.gpus else
              f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    first, last = float(np.mean(losses[:5])), float(np.mean(losses[-5:]))
    if len(losses) != steps or not np.isfinite(losses).all() or not last < first:
        raise Failed(f"the loss did not fall: mean of the first 5 steps {first:.3f}, of the last 5 {last:.3f}")
    return f"mbf width 0.25, {steps} steps: loss {first:.2f} -> {last:.2f}, step {step_ms:.0f} ms, {memory}"


def check_dist_2rank(m: Machine) -> str:
    """2 ranks through paddle.distributed.launch: DataParallel + Partial FC gradients equal one rank's on the same
    global batch (eval-mode BatchNorm, so the per-rank half batches do not change the statistics)."""
    if m.gpus == 1:
        raise Skip("needs 2 GPUs (found 1)")
    if not m.gpus and m.quick:
        raise Skip(f"needs 2 GPUs for NCCL ({m.gpu_reason}); without --quick the same check runs on 2 gloo CPU ranks")
    out = m.work / "dist"
    out.mkdir()
    model = _small_model()
    paddle.save(model.state_dict(), str(out / "init.pdparams"))
    devices = ["--devices", "0,1"] if m.gpus else ["--nproc_per_node", "2"]
    cmd = [sys.executable, "-m", "paddle.distributed.launch", *devices, "--log_dir", str(out / "log"),
           str(Path(__file__).resolve()), "--dist-worker", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if not m.gpus:
        env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        logs = "".join(p.read_text(errors="replace")[-600:] for p in sorted((out / "log").glob("workerlog.*")))
        raise Failed(f"the 2-rank launch exited with {proc.returncode}: {logs.strip()[-600:]}")
    expected = _dist_step(model, world=1)
    ranks = [dict(np.load(out / f"rank{r}.npz")) for r in (0, 1)]
    got = {"loss": ranks[0]["loss"], "backbone_grad": ranks[0]["backbone_grad"],
           "centre_grad": np.concatenate([r["centre_grad"] for r in ranks])}
    key, diff = _worst({k: expected[k] for k in got}, got)
    if not np.array_equal(ranks[0]["backbone_grad"], ranks[1]["backbone_grad"]):
        raise Failed("the ranks hold different backbone gradients after DataParallel's all-reduce")
    if not diff <= m.tolerance * 10:
        raise Failed(f"2-rank gradients differ from 1 rank in {key} by {diff:.2e} (relative)")
    return f"{'NCCL' if m.gpus else 'gloo (CPU)'} 2 ranks vs 1: max rel diff {diff:.1e} ({key})"


def _dist_step(model: paddle.nn.Layer, world: int, rank: int = 0) -> dict[str, np.ndarray]:
    """One forward/backward of the small net + Partial FC on this rank's share of a fixed global batch."""
    rng = np.random.default_rng(3)
    images = rng.standard_normal((DIST_BATCH, 3, 112, 112)).astype(np.float32)
    labels = rng.integers(0, DIST_CLASSES, DIST_BATCH).astype(np.int64)
    share = slice(rank * DIST_BATCH // world, (rank + 1) * DIST_BATCH // world)
    pfc = PartialFC(CombinedMarginLoss(64.0, 1.0, 0.5, 0.0), DIM, DIST_CLASSES, seed=5)
    model.eval()
    net = paddle.DataParallel(model) if world > 1 else model
    loss = pfc(net(paddle.to_tensor(images[share])), paddle.to_tensor(labels[share]))
    loss.backward()
    grads = [p.grad.numpy().ravel() for p in model.parameters() if p.grad is not None]
    return {"loss": np.array([float(loss)]), "backbone_grad": np.concatenate(grads),
            "centre_grad": np.asarray(pfc.pending_gradient()[1])}


def dist_worker(out: Path) -> int:
    """One rank of check_dist_2rank (started by paddle.distributed.launch)."""
    from utils.distributed import init_distributed

    rank, world = init_distributed()
    if paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count():
        paddle.set_device(f"gpu:{paddle.distributed.ParallelEnv().device_id}")
    model = get_model(NETWORK, num_features=DIM, width=WIDTH)
    load_weights(model, out / "init.pdparams")  # the parent's small net
    np.savez(out / f"rank{rank}.npz", **_dist_step(model, world, rank))
    return 0


def check_data(m: Machine) -> str:
    """The training loader's images/s (1 worker) against a single core decoding the same JPEGs (bench/loader.py)."""
    from bench.loader import cv2_imdecode, decode_rate, loader_rate
    from dataset import RecordIODataset
    from synthetic import ensure_synthetic

    identities = 40 if m.quick else 200
    with contextlib.redirect_stderr(io.StringIO()):  # its progress bar
        root = ensure_synthetic(m.work / "cache", identities, 16, 20, seed=0)
    ds = RecordIODataset(root, train=True, seed=0)
    payloads = [bytes(p) for p in ds._samples(np.arange(len(ds)))[0]]
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
    paddle.save(_small_model().state_dict(), str(weights))
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


def _importable(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


CHECKS: dict[str, Callable[[Machine], str]] = {
    "backbone": check_backbone, "backbone_nhwc": check_backbone_nhwc, "backbone_to_static": check_backbone_to_static,
    "backbone_amp": check_backbone_amp, "head": check_head, "head_fused": check_head_fused, "train": check_train,
    "dist_2rank": check_dist_2rank, "data": check_data, "export": check_export, "export_gpu": check_export_gpu,
    "export_tensorrt_fp16": check_export_tensorrt, "export_onnx_cuda": check_export_onnx_cuda,
}


def run_check(name: str, m: Machine) -> dict[str, Any]:
    start = time.perf_counter()
    try:
        result = {"name": name, "status": "pass", "detail": CHECKS[name](m)}
    except Skip as e:
        result = {"name": name, "status": "skip", "reason": str(e)}
    except Failed as e:
        result = {"name": name, "status": "fail", "detail": str(e)}
    except Exception as e:  # a crash is a failure of the check, reported with where it happened
        where = traceback.extract_tb(e.__traceback__)[-1]
        result = {"name": name, "status": "fail",
                  "detail": f"{type(e).__name__}: {str(e).strip()[:300]} ({Path(where.filename).name}:{where.lineno})"}
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def print_table(results: list[dict[str, Any]]) -> None:
    width = max(len(r["name"]) for r in results)
    print(f"{'check':<{width}}  {'status':<6}  {'s':>5}  figure / reason")
    for r in results:
        print(f"{r['name']:<{width}}  {r['status']:<6}  {r['seconds']:>5.1f}  {r.get('detail') or r.get('reason')}")


def main(argv: list[str] | None = None) -> int:
    from utils.cpu import prefer_avx2_mkl
    prefer_avx2_mkl()  # before any Paddle math (utils/cpu.py)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--quick", action="store_true", help="smaller inputs and fewer repeats (CI)")
    parser.add_argument("--only", help=f"comma-separated checks to run (of {', '.join(CHECKS)})")
    parser.add_argument("--dist-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.dist_worker:
        return dist_worker(args.dist_worker)
    names = list(CHECKS) if args.only is None else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in CHECKS]
    if unknown or not names:
        parser.exit(2, f"{parser.prog}: error: --only: unknown check {', '.join(unknown) or '(none given)'}; "
                       f"choose from {', '.join(CHECKS)}\n")
    if args.json is not None:
        try:
            check_writable(args.json)
        except OSError as e:
            parser.exit(2, f"{parser.prog}: error: --json: {e}\n")

    started = time.perf_counter()
    env = environment()
    print("environment: " + ", ".join(f"{k} {v}" for k, v in env.items() if k != "gpu_names"))
    gpu_reason = gpu_missing()
    paddle.set_device("cpu" if gpu_reason else "gpu")
    work = Path(tempfile.mkdtemp(prefix="arcface_selfcheck_"))
    try:
        machine = Machine(args.quick, work, 0 if gpu_reason else env["gpus"], gpu_reason)
        results = [run_check(name, machine) for name in names]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table(results)
    counts = {s: sum(r["status"] == s for r in results) for s in ("pass", "fail", "skip")}
    total = time.perf_counter() - started
    print(f"{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped in {total:.0f} s")
    if args.json is not None:
        report = {"environment": env, "quick": args.quick, "seconds": round(total, 1), "checks": results}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.json, json.dumps(report, indent=1) + "\n")
    return 1 if counts["fail"] else 0


if __name__ == "__main__":
    sys.exit(main())
