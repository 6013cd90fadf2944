"""Parameter and FLOP counts of the backbones (`python -m backbones --summary`)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import paddle
from paddle import nn

from . import NETWORKS, get_model
from .vit import Attention

_RUNNING_STATS = ("._mean", "._variance")  # BatchNorm buffers: Paddle keeps them as parameters, torch does not


def count_parameters(model: nn.Layer) -> int:
    """Learnable-tensor elements, counted as torch's `sum(p.numel() for p in model.parameters())`."""
    return sum(math.prod(p.shape) for name, p in model.named_parameters() if not name.endswith(_RUNNING_STATS))


def count_macs(model: nn.Layer, size: int = 112) -> int:
    """Multiply-accumulates of the convolutions, linear layers and attention matmuls for one size x size image.

    Attention's q @ k^T and attn @ v are counted like arcface_torch's `extra_gflops` (2 * tokens^2 * dim per block).
    """
    macs = 0

    def conv_hook(layer: nn.Conv2D, inputs: tuple, output: paddle.Tensor) -> None:
        nonlocal macs
        kernel = math.prod(layer.weight.shape[1:])  # in_channels / groups * kh * kw
        macs += math.prod(output.shape[1:]) * kernel

    def linear_hook(layer: nn.Linear, inputs: tuple, output: paddle.Tensor) -> None:
        nonlocal macs
        macs += math.prod(layer.weight.shape) * math.prod(output.shape[1:-1])  # per token for a ViT's [B, N, D]

    def attention_hook(layer: Attention, inputs: tuple, output: paddle.Tensor) -> None:
        nonlocal macs
        macs += Attention.matmul_macs(*inputs[0].shape[1:])

    kinds = ((nn.Conv2D, conv_hook), (nn.Linear, linear_hook), (Attention, attention_hook))
    hooks = [layer.register_forward_post_hook(hook) for layer in model.sublayers() for kind, hook in kinds
             if isinstance(layer, kind)]
    model.eval()
    with paddle.no_grad():
        model(paddle.zeros([1, 3, size, size]))
    for hook in hooks:
        hook.remove()
    return macs


def summary(networks: tuple[str, ...] = NETWORKS, width: float = 1.0) -> Iterator[dict]:
    """One row per network, as each is measured (r2060 and vit_h take a while)."""
    for name in networks:
        model = get_model(name, width=width)
        yield {"network": name, "width": width, "params": count_parameters(model), "gmacs": count_macs(model) / 1e9}
        del model
