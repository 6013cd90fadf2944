"""Activation recompute (`--recompute true`): keep only a segment's input, run its forward again in backward.

Paddle's `fleet.utils.recompute` replays the forward's RNG state, so drop path and dropout draw the same
masks the second time (gradients equal the plain run's: tests/test_vit.py). What it does not undo is the second
forward's BatchNorm running-statistics update: torch's checkpoint has the same flaw (arcface_torch's r2060 moves
its statistics twice per step). Here the replay restores them, so a recomputed run keeps the plain run's
statistics exactly.

With several ranks, paddle.DataParallel's gradient reducer refuses the replay's nested backward ("parameter ...
has been ready before"): a recomputing model runs its forward under `deferred_sync` and its gradients are
averaged by `all_reduce_gradients` before the optimizer step (tests/test_vit.py, 2 ranks).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import paddle
from paddle import nn
from paddle.distributed.fleet.utils import recompute
from paddle.distributed.fleet.utils.hybrid_parallel_util import fused_allreduce_gradients


def _running_stats(layers: Sequence[nn.Layer]) -> list[paddle.Tensor]:
    return [t for layer in layers for norm in layer.sublayers(include_self=True)
            if isinstance(norm, nn.layer.norm._BatchNormBase) for t in (norm._mean, norm._variance)]


class _Replay:
    """What recompute runs: its second call (the replay in backward) leaves BN statistics as it found them."""

    def __init__(self, layers: Sequence[nn.Layer]):
        self.layers = layers
        self.calls = 0

    def __call__(self, x: paddle.Tensor) -> paddle.Tensor:
        self.calls += 1
        stats = _running_stats(self.layers) if self.calls > 1 else []
        saved = [t.clone() for t in stats]
        for layer in self.layers:
            x = layer(x)
        with paddle.no_grad():
            for tensor, value in zip(stats, saved, strict=True):
                tensor.set_value(value)
        return x


def run_checkpointed(layers: Sequence[nn.Layer], x: paddle.Tensor) -> paddle.Tensor:
    """The layers applied in turn to x; their inner activations are freed after forward, recomputed in backward."""
    return recompute(_Replay(layers), x, preserve_rng_state=True, use_reentrant=True)


def run_stage_checkpointed(stage: nn.Sequential, x: paddle.Tensor) -> paddle.Tensor:
    """A stage of n blocks as segments of ceil(sqrt(n)) blocks: ~2 sqrt(n) blocks' activations alive, not n.

    (r2060's third stage has 896 blocks: one segment would hold them all again during its replay.)
    """
    blocks = list(stage)
    size = math.ceil(math.sqrt(len(blocks)))
    for start in range(0, len(blocks), size):
        x = run_checkpointed(blocks[start:start + size], x)
    return x


def _synced_by_hand(model: nn.Layer) -> bool:
    return isinstance(model, paddle.DataParallel) and getattr(model._layers, "recompute", False)


def deferred_sync(model: nn.Layer) -> contextlib.AbstractContextManager:
    """For the forward of a DataParallel model that recomputes: its reducer stays off (see the module doc)."""
    return model.no_sync() if _synced_by_hand(model) else contextlib.nullcontext()


def all_reduce_gradients(model: nn.Layer) -> None:
    """Average the gradients over the ranks, as DataParallel would have, if `deferred_sync` held its reducer off."""
    if _synced_by_hand(model):
        fused_allreduce_gradients(list(model.parameters()), None)
