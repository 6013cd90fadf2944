"""MobileFaceNet as arcface_torch builds it (`mbf`: blocks (1, 4, 6, 2), scale 2; `mbf_large`: (2, 8, 12, 4), scale 4).

Stem conv3x3/2, a depthwise stage, three stride-2 DepthWise blocks each followed by residual DepthWise blocks
(1x1 expand -> 3x3 depthwise -> 1x1 linear project), `conv_sep` 1x1 to 512, and the GDC head (7x7 depthwise
conv + BN, flatten, Linear without bias, BatchNorm1d). Layer names equal arcface_torch's state_dict keys.

`data_format="NHWC"` keeps the activations channels-last (faster convolutions on GPUs with AMP) with the same
parameters and state dict; the input stays NCHW (transposed once inside), so exported models do not change.
"""

from __future__ import annotations

import paddle
from paddle import nn

from .layers import PReLU, batch_norm_1d, batch_norm_2d, kaiming_fan_out_attr, scaled_channels

ARCHITECTURES = {"mbf": ((1, 4, 6, 2), 2), "mbf_large": ((2, 8, 12, 4), 4)}


def _conv(in_c: int, out_c: int, kernel: int, stride: int, padding: int, groups: int, data_format: str) -> nn.Conv2D:
    return nn.Conv2D(in_c, out_c, kernel, stride=stride, padding=padding, groups=groups,
                     weight_attr=kaiming_fan_out_attr(out_c * kernel * kernel), bias_attr=False,
                     data_format=data_format)


class ConvBlock(nn.Layer):
    """conv + BN + PReLU."""

    def __init__(self, in_c: int, out_c: int, kernel: int = 1, stride: int = 1, padding: int = 0, groups: int = 1,
                 data_format: str = "NCHW"):
        super().__init__()
        self.layers = nn.Sequential(_conv(in_c, out_c, kernel, stride, padding, groups, data_format),
                                    batch_norm_2d(out_c, data_format), PReLU(out_c, data_format))

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.layers(x)


class LinearBlock(nn.Layer):
    """conv + BN, no activation (the projection of a bottleneck)."""

    def __init__(self, in_c: int, out_c: int, kernel: int = 1, stride: int = 1, padding: int = 0, groups: int = 1,
                 data_format: str = "NCHW"):
        super().__init__()
        self.layers = nn.Sequential(_conv(in_c, out_c, kernel, stride, padding, groups, data_format),
                                    batch_norm_2d(out_c, data_format))

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.layers(x)


class DepthWise(nn.Layer):
    """Bottleneck: 1x1 to `groups` channels, 3x3 depthwise (with `stride`), 1x1 linear projection to `out_c`."""

    def __init__(self, in_c: int, out_c: int, groups: int, stride: int = 2, residual: bool = False,
                 data_format: str = "NCHW"):
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(
            ConvBlock(in_c, groups, data_format=data_format),
            ConvBlock(groups, groups, kernel=3, stride=stride, padding=1, groups=groups, data_format=data_format),
            LinearBlock(groups, out_c, data_format=data_format))

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        out = self.layers(x)
        return out + x if self.residual else out


class Residual(nn.Layer):
    def __init__(self, channels: int, num_block: int, groups: int, data_format: str = "NCHW"):
        super().__init__()
        self.layers = nn.Sequential(*[DepthWise(channels, channels, groups, stride=1, residual=True,
                                                data_format=data_format) for _ in range(num_block)])

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.layers(x)


class GDC(nn.Layer):
    """Global depthwise conv head: 7x7 depthwise + BN, flatten, Linear (no bias), BatchNorm1d.

    The 7x7 conv leaves 1x1 pixel, so the flattened features are the same in NCHW and NHWC.
    """

    def __init__(self, channels: int, num_features: int, data_format: str = "NCHW"):
        super().__init__()
        self.layers = nn.Sequential(
            LinearBlock(channels, channels, kernel=7, groups=channels, data_format=data_format),
            nn.Flatten(),
            nn.Linear(channels, num_features, weight_attr=kaiming_fan_out_attr(num_features), bias_attr=False),
            batch_norm_1d(num_features))

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.layers(x)


class MobileFaceNet(nn.Layer):
    def __init__(self, blocks: tuple[int, int, int, int] = (1, 4, 6, 2), scale: int = 2, num_features: int = 512,
                 fp16: bool = False, width: float = 1.0, data_format: str = "NCHW"):
        super().__init__()
        self.fp16 = fp16
        self.float_dtype = paddle.get_default_dtype()  # float32, unless built for a float64 reference
        self.data_format = data_format
        fmt = {"data_format": data_format}

        def ch(c: int) -> int:
            return scaled_channels(c, width)

        c64, c128 = ch(64 * scale), ch(128 * scale)
        if blocks[0] == 1:  # a single depthwise-ish conv with 2 channels per group (64 groups at width 1)
            stage0 = ConvBlock(c64, c64, kernel=3, stride=1, padding=1, groups=c64 // scale, **fmt)
        else:
            stage0 = Residual(c64, blocks[0], ch(128), **fmt)
        self.layers = nn.LayerList([
            ConvBlock(3, c64, kernel=3, stride=2, padding=1, **fmt),
            stage0,
            DepthWise(c64, c64, ch(128), **fmt),
            Residual(c64, blocks[1], ch(128), **fmt),
            DepthWise(c64, c128, ch(256), **fmt),
            Residual(c128, blocks[2], ch(256), **fmt),
            DepthWise(c128, c128, ch(512), **fmt),
            Residual(c128, blocks[3], ch(256), **fmt),
        ])
        self.conv_sep = ConvBlock(c128, ch(512), **fmt)
        self.features = GDC(ch(512), num_features, **fmt)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        # The body may run in fp16 (GPU AMP); conv_sep and the head always run in fp32, as in arcface_torch.
        with paddle.amp.auto_cast(enable=self.fp16):
            if self.data_format == "NHWC":
                x = x.transpose([0, 2, 3, 1])
            for layer in self.layers:
                x = layer(x)
        return self.features(self.conv_sep(x.astype(self.float_dtype)))


def mobilefacenet(name: str, **kwargs) -> MobileFaceNet:
    blocks, scale = ARCHITECTURES[name]
    return MobileFaceNet(blocks, scale, **kwargs)
