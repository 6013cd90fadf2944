"""Parameter and FLOP counts of the backbones (`python -m backbones --summary`)."""

from __future__ import annotations

import math

import paddle
from paddle import nn

from . import NETWORKS, get_model

_RUNNING_STATS = ("._mean", "._variance")  # BatchNorm buffers: Paddle keeps them as parameters, torch does not


def count_parameters(model: nn.Layer) -> int:
    """Learnable-tensor elements, counted as torch's `sum(p.numel() for p in model.parameters())`."""
    return sum(math.prod(p.shape) for name, p in model.named_parameters() if not name.endswith(_RUNNING_STATS))


def count_macs(model: nn.Layer, size: int = 112) -> int:
    """Multiply-accumulates of the convolutions and linear layers for one size x size image."""
    macs = 0

    def conv_hook(layer: nn.Conv2D, inputs: tuple, output: paddle.Tensor) -> None:
        nonlocal macs
        kernel = math.prod(layer.weight.shape[1:])  # in_channels / groups * kh * kw
        macs += math.prod(output.shape[1:]) * kernel

    def linear_hook(layer: nn.Linear, inputs: tuple, output: paddle.Tensor) -> None:
        nonlocal macs
        macs += math.prod(layer.weight.shape)

    hooks = [layer.register_forward_post_hook(conv_hook if isinstance(layer, nn.Conv2D) else linear_hook)
             for layer in model.sublayers() if isinstance(layer, nn.Conv2D | nn.Linear)]
    model.eval()
    with paddle.no_grad():
        model(paddle.zeros([1, 3, size, size]))
    for hook in hooks:
        hook.remove()
    return macs


def summary(networks: tuple[str, ...] = NETWORKS, width: float = 1.0) -> list[dict]:
    rows = []
    for name in networks:
        model = get_model(name, width=width)
        rows.append({"network": name, "width": width, "params": count_parameters(model),
                     "gmacs": count_macs(model) / 1e9})
        del model
    return rows
