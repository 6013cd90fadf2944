"""`train(cfg)`: a training run, wired from engine's parts (setup, build, resume, the loop of steps and hooks)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import ExitStack, closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paddle

from backbones import load_weights
from config import Config, ConfigError, format_config
from engine.hooks import Checkpointer, StepLogger, Verifier, epoch_progress, last_checkpoint
from engine.setup import build_data, prepare_run_dir, process_settings, run_dir, training_logger
from engine.step import Schedule, TrainingError, TrainStep, build_backbone, build_head, build_optimizer
from pfc.amp import DynamicLossScale
from utils import checkpoint as ckpt_io
from utils.distributed import cores_per_rank, init_distributed
from utils.locks import hold_run_dir
from utils.logger import MetricsWriter, format_eta


@dataclass(frozen=True)
class Run:
    """A run's settings and surroundings, set up once (`cfg` with num_classes resolved)."""

    cfg: Config
    directory: Path
    rank: int
    world: int
    on_gpu: bool
    log: logging.Logger
    data_dir: Path
    num_images: int
    loader: Any
    metrics: MetricsWriter | None  # rank 0's


def train(cfg: Config) -> int:
    """Train in `output/run_name`; rank 0 holds the directory locked until the run ends (or dies)."""
    rank, world = init_distributed()
    if cfg.resume not in (None, ckpt_io.LATEST):  # a mistyped path fails before the run directory is made
        ckpt_io.resolve_checkpoint(cfg.resume, run_dir(cfg))
    with ExitStack() as stack:
        run = _start(cfg, rank, world, stack)
        backbone, trainer, schedule = _build(run)
        if run.cfg.resume is not None:
            _resume(run, trainer, backbone)
        trainer.model = _wrap(backbone, run)
        _log_plan(run, trainer, schedule)
        checkpointer = Checkpointer(run.directory, run.cfg, backbone, trainer, run.loader, rank, world, run.log)
        verify = Verifier(run.cfg, run.data_dir, run.directory, trainer.model, run.metrics, rank, world, run.log)
        if run.cfg.val_at_start and trainer.step == 0:
            verify.before_training()
        start_time = time.perf_counter()
        _loop(run, trainer, schedule, checkpointer, verify)
        checkpointer.save(trainer.step)
        checkpointer.save_model()
        verify.after_training(trainer.step)
        run.log.info("done in %s: %s", format_eta(time.perf_counter() - start_time), run.directory)
    return 0


def _start(cfg: Config, rank: int, world: int, stack: ExitStack) -> Run:
    """The run directory (locked by rank 0), process settings, logger, data and config.json; `stack` undoes them."""
    directory = run_dir(cfg)
    if rank == 0:
        stack.enter_context(hold_run_dir(directory))
    threads = cfg.threads or cores_per_rank()
    on_gpu = stack.enter_context(process_settings(threads))
    prepare_run_dir(directory, cfg, rank, world)
    log = stack.enter_context(training_logger(directory, rank))
    log.info("run directory %s (rank %d of %d, %s, %d threads)", directory, rank, world, "GPU" if on_gpu else "CPU",
             threads)
    paddle.seed(cfg.seed)  # the same on every rank: identical initial backbones
    cfg, data_dir, dataset, loader = build_data(cfg, rank, world, log)
    if rank == 0:
        ckpt_io.write_text_atomic(directory / "config.json", cfg.to_json() + "\n")
        log.info("config (%s):\n%s", cfg.preset, format_config(cfg))
    metrics = stack.enter_context(closing(MetricsWriter(directory))) if rank == 0 else None
    return Run(cfg, directory, rank, world, on_gpu, log, data_dir, len(dataset), loader, metrics)


def _loop(run: Run, trainer: TrainStep, schedule: Schedule, checkpointer: Checkpointer, verify: Verifier) -> None:
    """Step until --stop_at_step or the schedule's end: log, save and verify every so many steps on the way."""
    cfg = run.cfg
    stop_step = min(schedule.total_steps, cfg.stop_at_step or schedule.total_steps)
    log_step = StepLogger(run.log, run.metrics, cfg.batch_size * run.world * cfg.gradient_acc,
                          schedule.total_steps, cfg.log_every)
    start_time, start_step = time.perf_counter(), trainer.step
    trainer.model.train()
    with closing(_endless(run.loader)) as batches:
        while trainer.step < stop_step:
            try:
                result = trainer(batches)
            except TrainingError as e:
                raise TrainingError(f"{e}; {last_checkpoint(run.directory)} (lower --lr and --resume)") from None
            step = trainer.step
            eta = (time.perf_counter() - start_time) / (step - start_step) * (stop_step - step)
            log_step(trainer, result, epoch_progress(run.loader), eta, last=step == stop_step)
            if cfg.save_every and step % cfg.save_every == 0 and step < stop_step:
                checkpointer.save(step)
            if cfg.val_every and step % cfg.val_every == 0 and step < stop_step:
                verify(step)


def _endless(loader: Any) -> Iterator[Any]:
    """The loader's batches, epoch after epoch (the sampler moves to the next epoch by itself: exact resume)."""
    while True:
        yield from loader


def _build(run: Run) -> tuple[paddle.nn.Layer, TrainStep, Schedule]:
    """The backbone (initialised from --init_backbone if given), a TrainStep over it and a new head, the schedule."""
    cfg, log = run.cfg, run.log
    if cfg.fp16 and not run.on_gpu:
        log.info("note: fp16 is ignored on CPU (Paddle has no fp16/bf16 CPU kernels for conv/bn: AMP would do "
                 "nothing); training in fp32")
    amp = cfg.fp16 and run.on_gpu
    backbone = build_backbone(cfg, amp)
    if cfg.init_backbone:
        load_weights(backbone, cfg.init_backbone, f"{cfg.network} (width {cfg.width}, embedding {cfg.embedding_size})")
        log.info("fine-tuning: backbone initialised from %s, new head", cfg.init_backbone)
    pfc = build_head(cfg, cfg.num_classes, amp)
    schedule = Schedule.of(cfg, len(run.loader))
    if schedule.total_steps == 0:
        raise ConfigError(f"--batch_size {cfg.batch_size}: {run.num_images} images give no full batch per rank")
    scheduler = schedule.scheduler(cfg)
    optimizer = build_optimizer(cfg, backbone.parameters(), scheduler)
    scaler = DynamicLossScale() if amp else None  # skips on inf/NaN in the backbone's or the head's gradients
    trainer = TrainStep(backbone, pfc, optimizer, scheduler, gradient_acc=cfg.gradient_acc, scaler=scaler,
                        max_bad_steps=cfg.max_bad_steps)
    return backbone, trainer, schedule


def _resume(run: Run, trainer: TrainStep, backbone: paddle.nn.Layer) -> None:
    """Weights, optimizer, head, schedule, sampler position and loss scale from --resume's checkpoint."""
    ckpt = ckpt_io.resolve_checkpoint(run.cfg.resume, run.directory)
    ckpt_io.check_compatible(ckpt, run.cfg)
    state = ckpt_io.load_checkpoint(ckpt, backbone=backbone, optimizer=trainer.optimizer, pfc=trainer.pfc,
                                    rank=run.rank)
    trainer.step = state["step"]
    run.loader.batch_sampler.load_state_dict(state["sampler"])
    if trainer.scaler is not None and state.get("scaler"):
        trainer.scaler.load_state_dict(state["scaler"])
    run.log.info("resumed from %s: step %d, epoch %.2f%s", ckpt, trainer.step, state["epoch"],
                 f" (saved with {state['world_size']} ranks: centres re-sharded)" if state["world_size"] != run.world
                 else "")


def _wrap(backbone: paddle.nn.Layer, run: Run) -> paddle.nn.Layer:
    """What runs the forward: the backbone, compiled by --to_static, inside DataParallel on several ranks."""
    model = backbone
    if run.cfg.to_static:
        # On CPU oneDNN must stay off: with FLAGS_use_mkldnn a to_static graph trains wrongly (the loss stalls).
        if not run.on_gpu and paddle.get_flags(["FLAGS_use_mkldnn"])["FLAGS_use_mkldnn"]:
            raise ConfigError("--to_static: FLAGS_use_mkldnn is on, and Paddle's oneDNN kernels train a static "
                              "graph wrongly on CPU; unset FLAGS_use_mkldnn or train with --to_static false")
        model = paddle.jit.to_static(model, full_graph=True)
    return paddle.DataParallel(model) if run.world > 1 else model


def _log_plan(run: Run, trainer: TrainStep, schedule: Schedule) -> None:
    cfg, rank, world, pfc = run.cfg, run.rank, run.world, trainer.pfc
    head = pfc.memory_plan(cfg.batch_size)
    local = pfc.num_local
    run.log.info("plan: %d classes (%d centres on rank %d, %s head: %d bytes/class of weights + %s = %.1f MB, per-step "
             "peak ~%.1f MB for %d sampled classes x %d embeddings), %d images, "
             "%d samples per epoch, %d steps of %d samples (%d epochs, %d warm-up steps)",
             cfg.num_classes, local, rank, pfc.backend, head["state_bytes_per_class"],
             "momentum" if cfg.optimizer == "sgd" else "Adam moments", local * head["state_bytes_per_class"] / 2**20,
             head["step_peak_bytes"] / 2**20, head["sampled_classes"], cfg.batch_size * world, run.num_images,
             schedule.micro_per_epoch * cfg.batch_size * world, schedule.total_steps,
             cfg.batch_size * world * cfg.gradient_acc, cfg.num_epoch, schedule.warmup_steps)
    if world > 1:  # every rank says what it holds (the launcher's workerlog.N)
        print(f"rank {rank}: {local} centres", flush=True)
