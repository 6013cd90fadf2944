"""Building blocks shared by the backbones: channel scaling and arcface_torch's weight initialisers.

arcface_torch initialises its layers in ways Paddle's defaults do not (PyTorch's Linear default, Kaiming
with fan_out); training from scratch should start from the same distributions, so they are spelled out here.
"""

from __future__ import annotations

import math

import numpy as np
import paddle
from paddle import nn
from paddle.autograd import PyLayer


def scaled_channels(channels: int, width: float) -> int:
    """`channels * width` rounded to a multiple of 8 (at least 8); width 1.0 is exact.

    Multiples of 8 keep grouped convolutions valid at any width (every group count divides its channels).
    """
    if width == 1.0:
        return channels
    return max(8, round(channels * width / 8) * 8)


def normal_attr(std: float) -> paddle.ParamAttr:
    return paddle.ParamAttr(initializer=nn.initializer.Normal(0.0, std))


def kaiming_fan_out_attr(fan_out: int) -> paddle.ParamAttr:
    """torch.nn.init.kaiming_normal_(mode='fan_out', nonlinearity='relu'): N(0, 2 / fan_out)."""
    return normal_attr(math.sqrt(2.0 / fan_out))


def torch_linear(in_features: int, out_features: int, bias: bool = True) -> nn.Linear:
    """nn.Linear initialised like torch.nn.Linear: U(-1/sqrt(in), 1/sqrt(in)) for weight and bias."""
    bound = 1.0 / math.sqrt(in_features)
    uniform = paddle.ParamAttr(initializer=nn.initializer.Uniform(-bound, bound))
    bias_attr = paddle.ParamAttr(initializer=nn.initializer.Uniform(-bound, bound)) if bias else False
    return nn.Linear(in_features, out_features, weight_attr=uniform, bias_attr=bias_attr)


class _TorchRunningVar:
    """Running variance updated with the unbiased batch variance, as PyTorch does (Paddle uses the biased one).

    Matters for `features` (BatchNorm1d over the batch only: n = batch size, a 1/(n-1) effect on every
    embedding); the correction is a few ops on a C-vector per layer.
    """

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        # F.batch_norm directly, not super().forward: that warns on every training call, and dy2static
        # (export) loses the class cell that a zero-argument super() needs, recursing forever
        if not self.training:
            return nn.functional.batch_norm(x, self._mean, self._variance, self.weight, self.bias, training=False,
                                            epsilon=self._epsilon, data_format=self._data_format)
        previous = self._variance.detach().clone()
        out = nn.functional.batch_norm(x, self._mean, self._variance, self._gamma(), self.bias, training=True,
                                       momentum=self._momentum, epsilon=self._epsilon, data_format=self._data_format)
        n = math.prod(x.shape) // self._mean.shape[0]  # values per channel, in NCHW and NHWC alike
        with paddle.no_grad():
            keep = self._momentum
            unbiased = keep * previous + (self._variance - keep * previous) * (n / max(n - 1, 1))
            if paddle.in_dynamic_mode():  # set_value leaves the version counter the kernel's backward checks
                self._variance.set_value(unbiased)
            else:  # a to_static graph (--to_static training) has no set_value
                paddle.assign(unbiased, output=self._variance)
        return out

    def _gamma(self) -> paddle.Tensor:
        """The weight for the training-mode kernel; a frozen one goes in as a detached copy that asks for a gradient.

        Paddle's batch-norm backward gives the bias no gradient at all when the weight tensor stops gradients
        (iresnet's `features`: gamma frozen, beta trained, as arcface_torch's requires_grad=False on the weight
        only). The copy's own gradient is a C-vector that nothing reads; the parameter itself never changes.
        """
        if not self.weight.stop_gradient:
            return self.weight
        gamma = self.weight.detach()
        gamma.stop_gradient = False
        return gamma


class BatchNorm2D(_TorchRunningVar, nn.BatchNorm2D):
    pass


class BatchNorm1D(_TorchRunningVar, nn.BatchNorm1D):
    pass


def batch_norm_2d(channels: int, data_format: str = "NCHW") -> BatchNorm2D:
    """BatchNorm2d with PyTorch's conventions (eps 1e-5, momentum 0.1 == Paddle momentum 0.9, unbiased var)."""
    return BatchNorm2D(channels, momentum=0.9, epsilon=1e-5, data_format=data_format)


def batch_norm_1d(features: int, frozen_weight: bool = False) -> BatchNorm1D:
    """BatchNorm1d with PyTorch's conventions; `frozen_weight` pins gamma at 1.0 (iresnet's `features` layer)."""
    weight = paddle.ParamAttr(initializer=nn.initializer.Constant(1.0), trainable=not frozen_weight)
    return BatchNorm1D(features, momentum=0.9, epsilon=1e-5, weight_attr=weight)


class _NumpyPReLU(PyLayer):
    """PReLU on CPU computed in NumPy on zero-copy DLPack views of Paddle tensors.

    Paddle's CPU prelu kernels are scalar loops with a division per element: forward and backward cost
    ~25% of an mbf training step. NumPy's vectorised passes are 4-8x faster forward, 3-4x backward
    (bench/RESULTS.md). Same convention as F.prelu and torch at x == 0 (negative branch).
    Results are written into Paddle-allocated tensors: handing NumPy-owned memory to Paddle
    (paddle.from_dlpack of an ndarray) made a resumed 2-rank training run diverge from the original.
    """

    @staticmethod
    def forward(ctx, x: paddle.Tensor, weight: paddle.Tensor, channels_last: bool = False) -> paddle.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.channels_last = channels_last
        xn = np.from_dlpack(x.detach())
        slope = _slope(weight, xn.ndim, channels_last)
        out = paddle.empty_like(x)  # Paddle owns every buffer; NumPy only writes into it
        on = np.from_dlpack(out)
        np.minimum(xn, 0, out=on)  # x + (a - 1) * min(x, 0)
        on *= slope - 1
        on += xn
        return out

    @staticmethod
    def backward(ctx, grad: paddle.Tensor) -> tuple[paddle.Tensor | None, paddle.Tensor | None]:
        x, weight = ctx.saved_tensor()
        xn, gn = np.from_dlpack(x.detach()), np.from_dlpack(grad.detach())
        slope = _slope(weight, xn.ndim, ctx.channels_last)
        grad_x = paddle.empty_like(grad)
        gx = np.from_dlpack(grad_x)
        np.multiply(gn, xn <= 0, out=gx)  # g * [x <= 0]
        grad_weight = None
        if not weight.stop_gradient:  # a frozen slope (fine-tuning) must get None, not a gradient
            grad_weight = paddle.empty_like(weight)
            if ctx.channels_last:
                c = xn.shape[-1]
                np.einsum("sc,sc->c", gx.reshape(-1, c), xn.reshape(-1, c), out=np.from_dlpack(grad_weight))
            else:
                n, c = xn.shape[:2]
                np.einsum("ncs,ncs->c", gx.reshape(n, c, -1), xn.reshape(n, c, -1), out=np.from_dlpack(grad_weight))
        if x.stop_gradient:
            return None, grad_weight
        gx *= slope - 1  # grad_x = g + (a - 1) * g * [x <= 0]
        gx += gn
        return grad_x, grad_weight


def _slope(weight: paddle.Tensor, ndim: int, channels_last: bool) -> np.ndarray:
    """The per-channel slopes as an array that broadcasts over the channel axis (1, or the last one)."""
    slope = np.from_dlpack(weight.detach())
    return slope if channels_last else slope.reshape(1, -1, *([1] * (ndim - 2)))


class PReLU(nn.Layer):
    """Per-channel PReLU (init 0.25) whose parameter is called `weight`, as in torch (Paddle's is `_weight`).

    Dygraph float32 on CPU runs the NumPy kernel above; GPU, AMP and static graphs (export) use F.prelu.
    Switch `PReLU.numpy_on_cpu` off for comparisons, or to take `paddle.grad` with respect to only some inputs
    (Paddle requires a PyLayer to return None for every tensor not asked for, which it cannot know).
    """

    numpy_on_cpu = True

    def __init__(self, channels: int, data_format: str = "NCHW"):
        super().__init__()
        self.data_format = data_format  # NHWC: the channel axis is the last one
        self.weight = self.create_parameter([channels], default_initializer=nn.initializer.Constant(0.25))

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        channels_last = self.data_format == "NHWC" and x.ndim == 4
        if self.numpy_on_cpu and paddle.in_dynamic_mode() and x.place.is_cpu_place() and x.dtype == paddle.float32:
            return _NumpyPReLU.apply(x, self.weight, channels_last)
        return nn.functional.prelu(x, self.weight, data_format="NHWC" if channels_last else "NCHW")
