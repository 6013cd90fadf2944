"""What a run does between optimizer steps: the log line and metrics record, checkpoints, verification."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import paddle

from config import Config
from engine.step import StepResult, TrainStep
from eval.callback import VerificationCallback
from utils import checkpoint as ckpt_io
from utils.logger import MetricsWriter, StepMeter, format_eta


def epoch_progress(loader: Any) -> float:
    """Epochs done so far, from the sampler's position (right across a change of world size)."""
    state = loader.batch_sampler.state_dict()
    return state["epoch"] + state["batch"] / len(loader)


def last_checkpoint(directory: Path) -> str:
    latest = directory / ckpt_io.CHECKPOINTS / ckpt_io.LATEST
    return f"last good checkpoint: {latest.parent / latest.read_text().strip()}" if latest.is_file() else \
        "no checkpoint was written yet"


def _plain(state: dict[str, Any]) -> dict[str, Any]:
    """Numbers, not tensors (the GradScaler's state goes into trainer_state.json)."""
    return {k: v.item() if hasattr(v, "item") else v for k, v in state.items()}


class Checkpointer:
    """Writes checkpoint `step` of `backbone` (the plain model, never its to_static or DataParallel wrapper)."""

    def __init__(self, directory: Path, cfg: Config, backbone: paddle.nn.Layer, trainer: TrainStep, loader: Any,
                 rank: int, world: int, log: logging.Logger) -> None:
        self.directory, self.cfg, self.backbone, self.trainer, self.loader = directory, cfg, backbone, trainer, loader
        self.rank, self.world, self.log = rank, world, log

    def save(self, step: int) -> None:
        scaler = self.trainer.scaler
        trainer_state = {"epoch": epoch_progress(self.loader), "sampler": self.loader.batch_sampler.state_dict(),
                         "scaler": _plain(scaler.state_dict()) if scaler is not None else None}
        path = ckpt_io.save_checkpoint(self.directory, step, backbone=self.backbone, optimizer=self.trainer.optimizer,
                                       pfc=self.trainer.pfc, trainer_state=trainer_state, cfg=self.cfg,
                                       rank=self.rank, world=self.world, keep=self.cfg.keep_checkpoints)
        self.log.info("step %d: checkpoint %s", step, path)

    def save_model(self) -> None:
        """The backbone's weights alone (rank 0), for evaluation and export."""
        if self.rank == 0:
            ckpt_io.save_paddle_atomic(self.backbone.state_dict(), self.directory / "model.pdparams")


class Verifier:
    """Verification accuracy of the model on cfg.val_targets (none: an empty result), recorded in metrics.jsonl.

    Every rank embeds its share of the verification images: gloo gives up on a collective after 30 s, so rank 0
    evaluating alone while the others wait at a barrier would fail on any real evaluation.
    """

    def __init__(self, cfg: Config, data_dir: Path, directory: Path, model: paddle.nn.Layer, metrics: Any,
                 rank: int, world: int, log: logging.Logger) -> None:
        self.callback = VerificationCallback(data_dir, cfg.val_targets, cfg.val_batch_size, directory, log,
                                             rank=rank, world_size=world) if cfg.val_targets else None
        self.model, self.metrics, self.log = model, metrics, log

    def __call__(self, step: int) -> dict[str, float]:
        results = self.callback(step, self.model) if self.callback is not None else {}
        if results and self.metrics is not None:
            self.metrics.write({"step": step, **{f"val/{k}": v for k, v in results.items()}})
        return results

    def before_training(self) -> None:
        for name, acc in self(0).items():
            self.log.info("accuracy before training: %s %.4f", name, acc)

    def after_training(self, step: int) -> None:
        for name, acc in self(step).items():
            self.log.info("accuracy after training (step %d): %s %.4f (best %.4f at step %d)", step, name, acc,
                          *self.callback.best[name])


class StepLogger:
    """Every `log_every` steps (and at the last): one log line and one metrics.jsonl record of the steps' means."""

    def __init__(self, log: logging.Logger, metrics: MetricsWriter | None, samples_per_step: int, total_steps: int,
                 log_every: int) -> None:
        self.log, self.metrics, self.total_steps, self.log_every = log, metrics, total_steps, log_every
        self.meter = StepMeter(samples_per_step)

    def __call__(self, trainer: TrainStep, result: StepResult, epoch: float, eta: float, last: bool) -> None:
        self.meter.update(result.loss, result.data_time, result.step_time)
        if trainer.step % self.log_every and not last:
            return
        s = self.meter.summary()
        self.meter.reset()
        scale = trainer.scaler.scale if trainer.scaler is not None else None
        self.log.info("step %d/%d epoch %.2f loss %.4f lr %.5f %.1f samples/s data %.3fs step %.3fs ETA %s%s",
                      trainer.step, self.total_steps, epoch, s["loss"], result.lr, s["samples_per_s"],
                      s["data_time"], s["step_time"], format_eta(eta),
                      f" amp scale {scale:g}" if scale is not None else "")
        if self.metrics is not None:
            self.metrics.write({"step": trainer.step, "time": round(time.time(), 3), "epoch": round(epoch, 4),
                                "loss": s["loss"], "lr": result.lr, "samples_per_s": s["samples_per_s"],
                                "data_time": s["data_time"], "step_time": s["step_time"], "eta_s": round(eta, 1),
                                **({"amp_scale": scale} if scale is not None else {})})
