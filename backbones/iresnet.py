"""IResNet (ArcFace's improved ResNet, "IR-SE" without SE) with arcface_torch's layer names.

Stem conv3x3(3->64) + BN + PReLU at 112x112; four stages of IBasicBlocks (BN-conv3x3-BN-PReLU-conv3x3-BN plus
shortcut), the first block of each stage striding by 2 on its second conv (112 -> 56 -> 28 -> 14 -> 7); then
BN2d, flatten, dropout, Linear(512*7*7 -> num_features) and a BatchNorm1d whose gamma is frozen at 1.0.
"""

from __future__ import annotations

import paddle
from paddle import nn

from .layers import PReLU, batch_norm_1d, batch_norm_2d, normal_attr, scaled_channels, torch_linear
from .recompute import run_stage_checkpointed

STAGE_BLOCKS = {"r18": (2, 2, 2, 2), "r34": (3, 4, 6, 3), "r50": (3, 4, 14, 3), "r100": (3, 13, 30, 3),
                "r200": (6, 26, 60, 6), "r2060": (3, 128, 896, 3)}
FEATURE_MAP = 7  # 112 / 2**4


def _conv(in_channels: int, out_channels: int, kernel: int, stride: int = 1, data_format: str = "NCHW") -> nn.Conv2D:
    # arcface_torch draws every iresnet conv weight from N(0, 0.1).
    return nn.Conv2D(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2,
                     weight_attr=normal_attr(0.1), bias_attr=False, data_format=data_format)


class IBasicBlock(nn.Layer):
    def __init__(self, inplanes: int, planes: int, stride: int = 1, data_format: str = "NCHW"):
        super().__init__()
        self.bn1 = batch_norm_2d(inplanes, data_format)
        self.conv1 = _conv(inplanes, planes, 3, data_format=data_format)
        self.bn2 = batch_norm_2d(planes, data_format)
        self.prelu = PReLU(planes, data_format)
        self.conv2 = _conv(planes, planes, 3, stride, data_format)
        self.bn3 = batch_norm_2d(planes, data_format)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(_conv(inplanes, planes, 1, stride, data_format),
                                            batch_norm_2d(planes, data_format))

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity


class IResNet(nn.Layer):
    def __init__(self, blocks: tuple[int, ...], num_features: int = 512, dropout: float = 0.0,
                 fp16: bool = False, width: float = 1.0, recompute: bool = False, data_format: str = "NCHW"):
        super().__init__()
        self.fp16 = fp16
        self.float_dtype = paddle.get_default_dtype()  # float32, unless built for a float64 reference
        self.recompute = recompute  # training keeps only segment inputs (backbones/recompute.py)
        # NHWC: channels-last activations, same parameters; the input stays NCHW (transposed once in forward)
        self.data_format = data_format
        planes = [scaled_channels(c, width) for c in (64, 128, 256, 512)]
        self.conv1 = _conv(3, planes[0], 3, data_format=data_format)
        self.bn1 = batch_norm_2d(planes[0], data_format)
        self.prelu = PReLU(planes[0], data_format)
        inplanes = planes[0]
        for index, (stage_planes, count) in enumerate(zip(planes, blocks, strict=True), start=1):
            stage = [IBasicBlock(inplanes, stage_planes, stride=2, data_format=data_format)]
            stage += [IBasicBlock(stage_planes, stage_planes, data_format=data_format) for _ in range(count - 1)]
            setattr(self, f"layer{index}", nn.Sequential(*stage))
            inplanes = stage_planes
        self.bn2 = batch_norm_2d(inplanes, data_format)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = torch_linear(inplanes * FEATURE_MAP * FEATURE_MAP, num_features)
        self.features = batch_norm_1d(num_features, frozen_weight=True)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        # The body may run in fp16 (GPU AMP); the embedding layers always run in fp32, as in arcface_torch.
        with paddle.amp.auto_cast(enable=self.fp16):
            if self.data_format == "NHWC":
                x = x.transpose([0, 2, 3, 1])
            x = self.prelu(self.bn1(self.conv1(x)))
            for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
                x = run_stage_checkpointed(stage, x) if self.recompute and self.training else stage(x)
            x = self.bn2(x)
            if self.data_format == "NHWC":  # fc's weight rows are in C, H, W order
                x = x.transpose([0, 3, 1, 2])
            x = self.dropout(paddle.flatten(x, 1))
        return self.features(self.fc(x.astype(self.float_dtype)))


def iresnet(name: str, **kwargs) -> IResNet:
    return IResNet(STAGE_BLOCKS[name], **kwargs)
