"""Activation recompute (`--recompute true`): keep only a segment's input, run its forward again in backward.

Paddle's `fleet.utils.recompute` replays the forward's RNG state, so drop path and dropout draw the same
masks the second time (gradients equal the plain run's: tests/test_vit.py). What it does not undo is the second
forward's BatchNorm running-statistics update: torch's checkpoint has the same flaw (arcface_torch's r2060 moves
its statistics twice per step). Here the replay restores them, so a recomputed run keeps the plain run's
statistics exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import paddle
from paddle import nn
from paddle.distributed.fleet.utils import recompute


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
