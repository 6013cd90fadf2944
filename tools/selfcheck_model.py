"""The checks of tools/selfcheck.py that run the network, the Partial FC head and training: their machine
description, outcomes and the small net they share."""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import paddle

from backbones import get_model, load_weights
from backbones.layers import PReLU
from losses import CombinedMarginLoss
from partial_fc import PartialFC

ROOT = Path(__file__).resolve().parent.parent

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




def small_model(**kwargs: Any) -> paddle.nn.Layer:
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
    model = small_model()
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
    nchw, nhwc = small_model(), small_model(data_format="NHWC")
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
        dygraph, compiled = small_model(), small_model()
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
    reference = small_model()
    reference.eval()
    x = paddle.to_tensor(_batch(8)[0])
    with paddle.no_grad():
        expected = reference(x).numpy()
    cosines = {}
    for label, kwargs, compile_ in (("NCHW", {}, False), ("NHWC", {"data_format": "NHWC"}, False),
                                    ("to_static", {}, True)):
        model = small_model(fp16=True, **kwargs)
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
    model = small_model()
    paddle.save(model.state_dict(), str(out / "init.pdparams"))
    devices = ["--devices", "0,1"] if m.gpus else ["--nproc_per_node", "2"]
    cmd = [sys.executable, "-m", "paddle.distributed.launch", *devices, "--log_dir", str(out / "log"),
           str(ROOT / "tools" / "selfcheck.py"), "--dist-worker", str(out)]
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


