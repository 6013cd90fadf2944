"""The builders of what trains and one optimizer step over them (train.py and the benchmarks use the same).

A step takes `gradient_acc` micro-batches from the loader: forward (under AMP on a GPU), the Partial FC loss,
backward of loss / gradient_acc (times the dynamic loss scale under AMP). Then the gradients are averaged over the
ranks where DataParallel's reducer was held off (backbones/recompute.py), the backbone and the head are updated at
the same learning rate (under AMP the scaler skips both on inf/NaN gradients), and the schedule moves on.
Without AMP a micro-batch whose loss is inf/NaN is skipped (no backward); `max_bad_steps` of them in a row stop
training.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import paddle

from backbones import get_model
from backbones.recompute import all_reduce_gradients, deferred_sync
from config import Config
from dataset import to_model_input
from losses import build_margin_loss
from partial_fc import PartialFC
from pfc.amp import DynamicLossScale
from utils.logger import LOGGER_NAME
from utils.lr_scheduler import PolynomialLRWarmup


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss stayed NaN); the message says why and what is left on disk."""


def build_backbone(cfg: Config, amp: bool = False) -> paddle.nn.Layer:
    return get_model(cfg.network, num_features=cfg.embedding_size, fp16=amp, dropout=cfg.dropout, width=cfg.width,
                     data_format=cfg.data_format, recompute=cfg.recompute)


def build_head(cfg: Config, num_classes: int, amp: bool = False) -> PartialFC:
    """This rank's share of the class centres, with their own optimizer state (cfg's optimizer, momentum, decay)."""
    return PartialFC(build_margin_loss(cfg), cfg.embedding_size, num_classes, sample_rate=cfg.sample_rate, fp16=amp,
                     optimizer=cfg.optimizer, momentum=cfg.momentum, weight_decay=cfg.weight_decay, seed=cfg.seed,
                     backend=cfg.pfc_backend, kernel=cfg.pfc_kernel)


@dataclass(frozen=True)
class Schedule:
    """Optimizer steps of a run: `micro_per_epoch` loader batches per epoch, `gradient_acc` of them per step."""

    micro_per_epoch: int
    total_steps: int
    warmup_steps: int

    @classmethod
    def of(cls, cfg: Config, micro_per_epoch: int) -> Schedule:
        return cls(micro_per_epoch, micro_per_epoch * cfg.num_epoch // cfg.gradient_acc,
                   micro_per_epoch * cfg.warmup_epoch // cfg.gradient_acc)

    def scheduler(self, cfg: Config) -> PolynomialLRWarmup:
        return PolynomialLRWarmup(cfg.lr, self.warmup_steps, self.total_steps)


def build_optimizer(cfg: Config, parameters: Iterable[paddle.Tensor],
                    scheduler: PolynomialLRWarmup) -> paddle.optimizer.Optimizer:
    """The backbone's optimizer: Momentum (`sgd`) or AdamW at the scheduler's rate, global-norm clipped if asked."""
    clip = paddle.nn.ClipGradByGlobalNorm(cfg.clip_grad_norm) if cfg.clip_grad_norm > 0 else None
    parameters = list(parameters)
    if cfg.optimizer == "sgd":
        return paddle.optimizer.Momentum(learning_rate=scheduler, momentum=cfg.momentum, parameters=parameters,
                                         weight_decay=cfg.weight_decay, grad_clip=clip)
    return paddle.optimizer.AdamW(learning_rate=scheduler, parameters=parameters, weight_decay=cfg.weight_decay,
                                  grad_clip=clip)


@dataclass(frozen=True)
class StepResult:
    loss: float  # mean over the step's micro-batches (a skipped one adds 0)
    lr: float  # the rate the step was taken at
    data_time: float  # seconds spent waiting for the loader
    step_time: float  # seconds of everything else


class TrainStep:
    """One optimizer step at a time; `step` counts the steps done (set it when resuming).

    `model` is what runs the forward (to_static and/or DataParallel around the backbone); `scaler` is a
    DynamicLossScale under AMP, else None.
    """

    def __init__(self, model: paddle.nn.Layer, pfc: PartialFC, optimizer: paddle.optimizer.Optimizer,
                 scheduler: PolynomialLRWarmup, *, gradient_acc: int = 1, scaler: DynamicLossScale | None = None,
                 max_bad_steps: int = 5, step: int = 0) -> None:
        self.model, self.pfc, self.optimizer, self.scheduler = model, pfc, optimizer, scheduler
        self.gradient_acc, self.scaler, self.max_bad_steps, self.step = gradient_acc, scaler, max_bad_steps, step
        self.bad_in_a_row = 0

    def __call__(self, batches: Iterator[tuple[paddle.Tensor, paddle.Tensor]]) -> StepResult:
        """Take `gradient_acc` (uint8 NHWC images, labels) batches from an endless iterator and step once."""
        start = tick = time.perf_counter()
        data_time = loss_sum = 0.0
        for _ in range(self.gradient_acc):
            images, labels = next(batches)
            data_time += time.perf_counter() - tick
            loss_sum += self._accumulate(images, labels)
            tick = time.perf_counter()
        lr = self._update()
        return StepResult(loss_sum / self.gradient_acc, lr, data_time, time.perf_counter() - start - data_time)

    def _autocast(self) -> AbstractContextManager:
        return paddle.amp.auto_cast(level="O1") if self.scaler is not None else nullcontext()

    def _accumulate(self, images: paddle.Tensor, labels: paddle.Tensor) -> float:
        """Forward and backward of one micro-batch; its loss, or 0 if it was skipped."""
        with self._autocast(), deferred_sync(self.model):  # a recomputing DataParallel model syncs by hand
            embeddings = self.model(to_model_input(images))
        loss = self.pfc(embeddings.astype("float32"), labels)
        value = float(loss)
        if not math.isfinite(value) and self.scaler is None:  # with AMP the scaler skips inf/NaN steps
            self._skip(value)
            return 0.0
        self.bad_in_a_row = 0
        scaled = loss / self.gradient_acc
        (self.scaler.scale_loss(scaled) if self.scaler is not None else scaled).backward()
        return value

    def _skip(self, value: float) -> None:
        self.bad_in_a_row += 1
        logging.getLogger(LOGGER_NAME).warning("step %d: loss is %s, batch skipped (%d in a row)", self.step + 1,
                                               value, self.bad_in_a_row)
        if self.bad_in_a_row >= self.max_bad_steps:
            raise TrainingError(f"loss was {value} for {self.bad_in_a_row} batches in a row at step {self.step + 1}: "
                                f"stopped")

    def _update(self) -> float:
        """Both updates at the scheduled rate (or, under AMP, neither on inf/NaN gradients); the rate used."""
        all_reduce_gradients(self.model)
        lr = self.scheduler()
        if self.scaler is not None:  # unscale and step both, or skip both; adapt the scale
            self.scaler.step(self.optimizer, self.model.parameters(), self.pfc, lr)
        else:
            self.optimizer.step()
            self.pfc.step(lr)
        self.optimizer.clear_grad()
        self.scheduler.step()
        self.step += 1
        return lr
