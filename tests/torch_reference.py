"""PyTorch reference of arcface_torch's backbones, written from the published architectures.

Only the module names matter for weight exchange: they reproduce arcface_torch's state_dict keys (checked
against ../shared/reference/arcface_torch_state_dicts.json). Used by the parity tests and bench/backbones.py.
"""

from __future__ import annotations

import torch
from torch import nn

IRESNET_BLOCKS = {"r18": (2, 2, 2, 2), "r34": (3, 4, 6, 3), "r50": (3, 4, 14, 3), "r100": (3, 13, 30, 3),
                  "r200": (6, 26, 60, 6)}
MBF = {"mbf": ((1, 4, 6, 2), 2), "mbf_large": ((2, 8, 12, 4), 4)}


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-5)


class IBasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = _bn(inplanes)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, padding=1, bias=False)
        self.bn2 = _bn(planes)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn3 = _bn(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), _bn(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class IResNet(nn.Module):
    def __init__(self, blocks: tuple[int, ...], num_features: int = 512):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        self.bn1 = _bn(64)
        self.prelu = nn.PReLU(64)
        inplanes = 64
        for index, (planes, count) in enumerate(zip((64, 128, 256, 512), blocks, strict=True), start=1):
            layers = [IBasicBlock(inplanes, planes, 2)] + [IBasicBlock(planes, planes) for _ in range(count - 1)]
            setattr(self, f"layer{index}", nn.Sequential(*layers))
            inplanes = planes
        self.bn2 = _bn(512)
        self.dropout = nn.Dropout(0.0)
        self.fc = nn.Linear(512 * 7 * 7, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-5)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))


class ConvBlock(nn.Module):
    def __init__(self, in_c: int, out_c: int, kernel: int = 1, stride: int = 1, padding: int = 0, groups: int = 1,
                 activation: bool = True):
        super().__init__()
        modules = [nn.Conv2d(in_c, out_c, kernel, stride, padding, groups=groups, bias=False), nn.BatchNorm2d(out_c)]
        self.layers = nn.Sequential(*modules, *([nn.PReLU(out_c)] if activation else []))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class DepthWise(nn.Module):
    def __init__(self, in_c: int, out_c: int, groups: int, stride: int = 2, residual: bool = False):
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(ConvBlock(in_c, groups), ConvBlock(groups, groups, 3, stride, 1, groups),
                                    ConvBlock(groups, out_c, activation=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x) + x if self.residual else self.layers(x)


class Residual(nn.Module):
    def __init__(self, channels: int, count: int, groups: int):
        super().__init__()
        self.layers = nn.Sequential(*[DepthWise(channels, channels, groups, 1, True) for _ in range(count)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class GDC(nn.Module):
    def __init__(self, num_features: int):
        super().__init__()
        self.layers = nn.Sequential(ConvBlock(512, 512, 7, groups=512, activation=False), nn.Flatten(),
                                    nn.Linear(512, num_features, bias=False), nn.BatchNorm1d(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class MobileFaceNet(nn.Module):
    def __init__(self, blocks: tuple[int, int, int, int], scale: int, num_features: int = 512):
        super().__init__()
        c64, c128 = 64 * scale, 128 * scale
        stage0 = ConvBlock(c64, c64, 3, 1, 1, groups=64) if blocks[0] == 1 else Residual(c64, blocks[0], 128)
        self.layers = nn.ModuleList([
            ConvBlock(3, c64, 3, 2, 1), stage0,
            DepthWise(c64, c64, 128), Residual(c64, blocks[1], 128),
            DepthWise(c64, c128, 256), Residual(c128, blocks[2], 256),
            DepthWise(c128, c128, 512), Residual(c128, blocks[3], 256)])
        self.conv_sep = ConvBlock(c128, 512)
        self.features = GDC(num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.features(self.conv_sep(x))


def get_torch_model(name: str, num_features: int = 512) -> nn.Module:
    if name in IRESNET_BLOCKS:
        return IResNet(IRESNET_BLOCKS[name], num_features)
    if name in MBF:
        return MobileFaceNet(*MBF[name], num_features)
    raise ValueError(f"unknown network {name!r}")


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights AND BatchNorm running statistics, so a parity check exercises every tensor.

    The running statistics are first calibrated on a random batch (so activations stay O(1) through r200, as in a
    trained net, and an absolute tolerance means something), then perturbed so that no statistic is at its default
    and swapping mean/var or dropping one would show. Returns the model in eval mode.
    """
    generator = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d)]
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                module.weight.normal_(0.0, module.weight[0].numel() ** -0.5, generator=generator)
                if module.bias is not None:
                    module.bias.uniform_(-0.1, 0.1, generator=generator)
            elif isinstance(module, nn.PReLU):
                module.weight.uniform_(0.0, 0.5, generator=generator)
        for norm in norms:
            norm.weight.uniform_(0.5, 1.5, generator=generator)  # also iresnet's frozen `features` gamma
            norm.bias.uniform_(-0.2, 0.2, generator=generator)
            norm.reset_running_stats()
            norm.momentum = None  # cumulative average over the calibration batch
        model.train()
        model(torch.randn(8, 3, 112, 112, generator=generator))
        for norm in norms:
            norm.momentum = 0.1
            std = norm.running_var.sqrt()
            norm.running_mean.add_(std * torch.empty_like(std).uniform_(-0.2, 0.2, generator=generator))
            norm.running_var.mul_(torch.empty_like(std).uniform_(0.7, 1.4, generator=generator))
    return model.eval()
