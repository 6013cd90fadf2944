"""Train an ArcFace model: backbone data parallel, Partial FC head model parallel.

    python train.py                                   # quick start: built-in synthetic faces, a few CPU minutes
    python train.py --config ms1mv3_r50 --data /data/ms1m-retinaface-t1
    python -m paddle.distributed.launch --nproc_per_node 8 train.py --config glint360k_r100 --data DIR
    python train.py --config ms1mv3_r50 --resume      # continue work_dirs/ms1mv3_r50 from its latest checkpoint
    python train.py --config ms1mv3_r50 --resume work_dirs/ms1mv3_r50/checkpoints/step_0004000 --run_name branch
                                                      # a new run (work_dirs/branch) from another run's checkpoint

Every config key can be overridden (`--KEY VALUE`, see `python train.py --help` and config.py). User mistakes
(missing dataset, bad key, mismatching checkpoint) end with one `train.py: error: ...` line and a non-zero exit;
Ctrl-C ends with one line and status 130. A run holds its directory locked: a second run into it is refused.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

os.environ.setdefault("GLOG_minloglevel", "2")
warnings.filterwarnings("ignore", message="No ccache found")  # Paddle's import-time note about C++ extensions
warnings.filterwarnings("ignore", message="Tensor do not have 'place'")  # to_static's own backward builder

import cv2
import paddle

from backbones import get_model, load_weights
from backbones.cpu import prefer_avx2_mkl
from backbones.recompute import all_reduce_gradients, deferred_sync
from config import Config, ConfigError, format_config, parse_args
from dataset import build_dataloader, build_dataset, dataset_dir, to_model_input
from eval.callback import VerificationCallback
from losses import build_margin_loss
from partial_fc import PartialFC
from pfc.amp import DynamicLossScale
from utils import checkpoint as ckpt_io
from utils.distributed import barrier, cores_per_rank, init_distributed
from utils.interrupt import sigint_noted
from utils.locks import hold_run_dir
from utils.logger import MetricsWriter, StepMeter, format_eta, setup_logger
from utils.lr_scheduler import PolynomialLRWarmup


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss stayed NaN); the message says why and what is left on disk."""


def _run_dir(cfg: Config) -> Path:
    """`output/run_name`, always: `--resume PATH` says where training starts from, never where it writes.

    A checkpoint of another run seeds a new run here; the run it came from is only read.
    """
    return Path(cfg.output) / cfg.run_name


def _prepare_run_dir(run_dir: Path, cfg: Config, rank: int, world: int) -> None:
    if rank == 0:
        has_checkpoints = any((run_dir / ckpt_io.CHECKPOINTS).glob("step_*"))
        if cfg.resume is None and has_checkpoints:
            raise ConfigError(f"{run_dir} already holds checkpoints: add --resume to continue that run, "
                              f"or --run_name NAME to start another")
        if cfg.resume is not None and has_checkpoints:
            ckpt = ckpt_io.resolve_checkpoint(cfg.resume, run_dir)
            if not ckpt.resolve().is_relative_to(run_dir.resolve()):
                raise ConfigError(f"--resume {cfg.resume}: a checkpoint of another run, and {run_dir} holds "
                                  f"checkpoints of its own; give a new --run_name to start a run from it")
        (run_dir / ckpt_io.CHECKPOINTS).mkdir(parents=True, exist_ok=True)
        ckpt_io.clean_stale(run_dir)
    barrier(world)


def _build_data(cfg: Config, rank: int, world: int, log: logging.Logger):
    """The training set and loader; the synthetic set is generated once (rank 0) before the others read it."""
    if cfg.data != "synthetic" and not Path(cfg.data).exists():
        raise FileNotFoundError(f"--data {cfg.data}: no such file or directory")
    if rank == 0:
        data_dir = dataset_dir(cfg)
    barrier(world)
    data_dir = dataset_dir(cfg)
    dataset = build_dataset(cfg, train=True)
    found = dataset.num_classes
    if cfg.num_classes is None:
        cfg.num_classes = found
    elif cfg.num_classes < found:
        raise ConfigError(f"--num_classes {cfg.num_classes} is smaller than the {found} classes found in {data_dir}")
    if cfg.num_image is not None and cfg.num_image != len(dataset):
        log.warning("num_image is %d but %s holds %d images; using the dataset", cfg.num_image, data_dir,
                    len(dataset))
    loader = build_dataloader(cfg, rank, world, dataset)
    return data_dir, dataset, loader


def _build_optimizer(cfg: Config, backbone: paddle.nn.Layer, scheduler: PolynomialLRWarmup):
    clip = paddle.nn.ClipGradByGlobalNorm(cfg.clip_grad_norm) if cfg.clip_grad_norm > 0 else None
    if cfg.optimizer == "sgd":
        return paddle.optimizer.Momentum(learning_rate=scheduler, momentum=cfg.momentum,
                                         parameters=backbone.parameters(), weight_decay=cfg.weight_decay,
                                         grad_clip=clip)
    return paddle.optimizer.AdamW(learning_rate=scheduler, parameters=backbone.parameters(),
                                  weight_decay=cfg.weight_decay, grad_clip=clip)


def _compile(backbone: paddle.nn.Layer, on_gpu: bool) -> paddle.nn.Layer:
    """`--to_static`: the backbone's forward as one static graph (the state dict is unchanged).

    On CPU, oneDNN must stay off: with FLAGS_use_mkldnn a to_static graph trains wrongly (the loss stalls).
    """
    if not on_gpu and paddle.get_flags(["FLAGS_use_mkldnn"])["FLAGS_use_mkldnn"]:
        raise ConfigError("--to_static: FLAGS_use_mkldnn is on, and Paddle's oneDNN kernels train a static graph "
                          "wrongly on CPU; unset FLAGS_use_mkldnn or train with --to_static false")
    return paddle.jit.to_static(backbone, full_graph=True)


def _epoch_progress(loader: Any) -> float:
    """Epochs done so far, from the sampler's position (right across a change of world size)."""
    state = loader.batch_sampler.state_dict()
    return state["epoch"] + state["batch"] / len(loader)


def _plain(state: dict[str, Any]) -> dict[str, Any]:
    """Numbers, not tensors (the GradScaler's state goes into trainer_state.json)."""
    return {k: v.item() if hasattr(v, "item") else v for k, v in state.items()}


def _last_checkpoint(run_dir: Path) -> str:
    latest = run_dir / ckpt_io.CHECKPOINTS / ckpt_io.LATEST
    return f"last good checkpoint: {latest.parent / latest.read_text().strip()}" if latest.is_file() else \
        "no checkpoint was written yet"


def train(cfg: Config) -> int:
    """Train in `output/run_name`; rank 0 holds the directory locked until the run ends (or dies)."""
    rank, world = init_distributed()
    if cfg.resume not in (None, ckpt_io.LATEST):  # a mistyped path fails before the run directory is made
        ckpt_io.resolve_checkpoint(cfg.resume, _run_dir(cfg))
    with hold_run_dir(_run_dir(cfg)) if rank == 0 else nullcontext():
        return _train(cfg, rank, world)


def _train(cfg: Config, rank: int, world: int) -> int:
    paddle.base.core.set_num_threads(cfg.threads or cores_per_rank())
    # The cores belong to Paddle's kernels; and an OpenCV thread pool alive in this process when DataLoader workers
    # fork deadlocks them (its condition variables are copied mid-wait), so OpenCV stays single-threaded here.
    cv2.setNumThreads(1)
    on_gpu = paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0
    paddle.set_device("gpu" if on_gpu else "cpu")

    run_dir = _run_dir(cfg)
    _prepare_run_dir(run_dir, cfg, rank, world)
    log = setup_logger(run_dir, rank)
    log.info("run directory %s (rank %d of %d, %s, %d threads)", run_dir, rank, world, "GPU" if on_gpu else "CPU",
             cfg.threads or cores_per_rank())

    paddle.seed(cfg.seed)  # the same on every rank: identical initial backbones
    data_dir, dataset, loader = _build_data(cfg, rank, world, log)
    if rank == 0:
        ckpt_io.write_text_atomic(run_dir / "config.json", cfg.to_json() + "\n")
        log.info("config (%s):\n%s", cfg.preset, format_config(cfg))

    use_amp = cfg.fp16 and on_gpu
    if cfg.fp16 and not on_gpu:
        log.info("note: fp16 is ignored on CPU (Paddle has no fp16/bf16 CPU kernels for conv/bn: AMP would do "
                 "nothing); training in fp32")
    backbone = get_model(cfg.network, num_features=cfg.embedding_size, fp16=use_amp, dropout=cfg.dropout,
                         width=cfg.width, data_format=cfg.data_format, recompute=cfg.recompute)
    if cfg.init_backbone:
        load_weights(backbone, cfg.init_backbone, f"{cfg.network} (width {cfg.width}, embedding {cfg.embedding_size})")
        log.info("fine-tuning: backbone initialised from %s, new head", cfg.init_backbone)
    pfc = PartialFC(build_margin_loss(cfg), cfg.embedding_size, cfg.num_classes, sample_rate=cfg.sample_rate,
                    fp16=use_amp, optimizer=cfg.optimizer, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                    seed=cfg.seed, backend=cfg.pfc_backend, kernel=cfg.pfc_kernel)

    micro_per_epoch = len(loader)
    total_steps = micro_per_epoch * cfg.num_epoch // cfg.gradient_acc
    warmup_steps = micro_per_epoch * cfg.warmup_epoch // cfg.gradient_acc
    if total_steps == 0:
        raise ConfigError(f"--batch_size {cfg.batch_size}: {len(dataset)} images give no full batch per rank")
    scheduler = PolynomialLRWarmup(cfg.lr, warmup_steps, total_steps)
    optimizer = _build_optimizer(cfg, backbone, scheduler)
    scaler = DynamicLossScale() if use_amp else None  # skips on inf/NaN in the backbone's or the head's gradients

    step = 0
    if cfg.resume is not None:
        ckpt = ckpt_io.resolve_checkpoint(cfg.resume, run_dir)
        ckpt_io.check_compatible(ckpt, cfg)
        state = ckpt_io.load_checkpoint(ckpt, backbone=backbone, optimizer=optimizer, pfc=pfc, rank=rank)
        step = state["step"]
        loader.batch_sampler.load_state_dict(state["sampler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        log.info("resumed from %s: step %d, epoch %.2f%s", ckpt, step, state["epoch"],
                 f" (saved with {state['world_size']} ranks: centres re-sharded)" if state["world_size"] != world
                 else "")
    if cfg.to_static:
        backbone = _compile(backbone, on_gpu)
    if world > 1:
        backbone = paddle.DataParallel(backbone)

    samples_per_step = cfg.batch_size * world * cfg.gradient_acc
    head = pfc.memory_plan(cfg.batch_size)
    local = pfc.num_local
    log.info("plan: %d classes (%d centres on rank %d, %s head: %d bytes/class of weights + %s = %.1f MB, per-step "
             "peak ~%.1f MB for %d sampled classes x %d embeddings), %d images, "
             "%d samples per epoch, %d steps of %d samples (%d epochs, %d warm-up steps)",
             cfg.num_classes, local, rank, pfc.backend, head["state_bytes_per_class"],
             "momentum" if cfg.optimizer == "sgd" else "Adam moments", local * head["state_bytes_per_class"] / 2**20,
             head["step_peak_bytes"] / 2**20, head["sampled_classes"], cfg.batch_size * world, len(dataset),
             micro_per_epoch * cfg.batch_size * world, total_steps, samples_per_step, cfg.num_epoch, warmup_steps)
    if world > 1:  # every rank says what it holds (the launcher's workerlog.N)
        print(f"rank {rank}: {local} centres", flush=True)

    # Every rank embeds its share of the verification images: gloo gives up on a collective after 30 s, so rank 0
    # evaluating alone while the others wait at a barrier would fail on any real evaluation.
    callback = None
    if cfg.val_targets:
        callback = VerificationCallback(data_dir, cfg.val_targets, cfg.val_batch_size, run_dir, log, rank=rank,
                                        world_size=world)
    metrics = MetricsWriter(run_dir) if rank == 0 else None

    def verify(at_step: int) -> dict[str, float]:
        results = callback(at_step, backbone) if callback is not None else {}
        if results and metrics is not None:
            metrics.write({"step": at_step, **{f"val/{k}": v for k, v in results.items()}})
        return results

    def save(at_step: int) -> None:
        trainer_state = {"epoch": _epoch_progress(loader), "sampler": loader.batch_sampler.state_dict(),
                         "scaler": _plain(scaler.state_dict()) if scaler is not None else None}
        path = ckpt_io.save_checkpoint(run_dir, at_step, backbone=getattr(backbone, "_layers", backbone),
                                       optimizer=optimizer, pfc=pfc, trainer_state=trainer_state, cfg=cfg,
                                       rank=rank, world=world, keep=cfg.keep_checkpoints)
        log.info("step %d: checkpoint %s", at_step, path)

    if cfg.val_at_start and step == 0:
        before = verify(0)
        for name, acc in before.items():
            log.info("accuracy before training: %s %.4f", name, acc)

    stop_step = min(total_steps, cfg.stop_at_step or total_steps)
    meter = StepMeter(samples_per_step)
    bad_steps, start_time, start_step = 0, time.perf_counter(), step
    amp_ctx = (lambda: paddle.amp.auto_cast(level="O1")) if use_amp else nullcontext
    backbone.train()
    # The sampler counts the batches handed out and moves to the next epoch by itself (exact resume position).
    micro = step * cfg.gradient_acc
    while step < stop_step:
        step_start = tick = time.perf_counter()
        data_time, loss_sum = 0.0, 0.0
        for images, labels in loader:
            data_time += time.perf_counter() - tick
            with amp_ctx(), deferred_sync(backbone):  # a recomputing DataParallel model syncs by hand (below)
                embeddings = backbone(to_model_input(images))
            loss = pfc(embeddings.astype("float32"), labels)
            loss_value = float(loss)
            micro += 1
            if math.isfinite(loss_value) or scaler is not None:  # with AMP the scaler skips inf/NaN steps
                bad_steps = 0
                loss_sum += loss_value
                (scaler.scale_loss(loss / cfg.gradient_acc) if scaler else loss / cfg.gradient_acc).backward()
            else:
                bad_steps += 1
                log.warning("step %d: loss is %s, batch skipped (%d in a row)", step + 1, loss_value, bad_steps)
                if bad_steps >= cfg.max_bad_steps:
                    raise TrainingError(f"loss was {loss_value} for {bad_steps} batches in a row at step {step + 1}: "
                                        f"stopped; {_last_checkpoint(run_dir)} (lower --lr and --resume)")
            if micro % cfg.gradient_acc:
                tick = time.perf_counter()
                continue
            all_reduce_gradients(backbone)
            lr = scheduler()
            if scaler is not None:  # unscale and step both, or skip both on inf/NaN gradients; adapt the scale
                scaler.step(optimizer, backbone.parameters(), pfc, lr)
            else:
                optimizer.step()
                pfc.step(lr)
            optimizer.clear_grad()
            scheduler.step()
            step += 1
            now = time.perf_counter()
            meter.update(loss_sum / cfg.gradient_acc, data_time, now - step_start - data_time)
            if step % cfg.log_every == 0 or step == stop_step:
                _log_step(log, metrics, meter, step, total_steps, _epoch_progress(loader), lr, scaler,
                          (now - start_time) / (step - start_step) * (stop_step - step))
                meter.reset()
            if cfg.save_every and step % cfg.save_every == 0 and step < stop_step:
                save(step)
            if cfg.val_every and step % cfg.val_every == 0 and step < stop_step:
                verify(step)
            if step >= stop_step:
                break
            step_start = tick = time.perf_counter()
            data_time, loss_sum = 0.0, 0.0

    save(step)
    if rank == 0:
        ckpt_io.save_paddle_atomic(getattr(backbone, "_layers", backbone).state_dict(), run_dir / "model.pdparams")
    results = verify(step)
    for name, acc in results.items():
        best = callback.best[name]
        log.info("accuracy after training (step %d): %s %.4f (best %.4f at step %d)", step, name, acc, *best)
    log.info("done in %s: %s", format_eta(time.perf_counter() - start_time), run_dir)
    if metrics is not None:
        metrics.close()
    return 0


def _log_step(log: logging.Logger, metrics: MetricsWriter | None, meter: StepMeter, step: int, total: int,
              epoch: float, lr: float, scaler: Any, eta: float) -> None:
    s = meter.summary()
    scale = scaler.scale if scaler is not None else None
    log.info("step %d/%d epoch %.2f loss %.4f lr %.5f %.1f samples/s data %.3fs step %.3fs ETA %s%s", step, total,
             epoch, s["loss"], lr, s["samples_per_s"], s["data_time"], s["step_time"], format_eta(eta),
             f" amp scale {scale:g}" if scale is not None else "")
    if metrics is not None:
        metrics.write({"step": step, "time": round(time.time(), 3), "epoch": round(epoch, 4), "loss": s["loss"],
                       "lr": lr, "samples_per_s": s["samples_per_s"],
                       "data_time": s["data_time"], "step_time": s["step_time"], "eta_s": round(eta, 1),
                       **({"amp_scale": scale} if scale is not None else {})})


def main(argv: list[str] | None = None) -> int:
    prefer_avx2_mkl()  # before any Paddle math (backbones/cpu.py)
    cfg = parse_args(argv)
    with sigint_noted() as interrupted:
        try:
            return train(cfg)
        except BaseException as e:
            if interrupted():  # whatever Paddle turned the KeyboardInterrupt into (utils/interrupt.py)
                print("train.py: interrupted; --resume continues from the last checkpoint", file=sys.stderr)
                return 130
            if not isinstance(e, (ValueError, OSError, TrainingError)):
                raise
            # user mistakes (ConfigError and UnsafePickleError are ValueErrors; OSErrors name their file): one line
            print(f"train.py: error: {e}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
