"""PyTorch reference of one arcface_torch training step (train_v2.py at sample_rate 1, one rank), for float64 runs.

Written from arcface_torch's published training code, independent of this project's: the backbone (iresnet or
MobileFaceNet, channel widths scaled for fast tests, `features` BatchNorm1d of iresnet with only gamma frozen), the
PartialFC_V2 full-softmax head (normalised embeddings and centres, cosines clamped to [-1, 1], the ArcFace margin
applied under `no_grad` so that its gradient is straight-through), SGD with arcface_torch's two parameter groups
(backbone, head; both with momentum 0.9 and weight decay), `clip_grad_norm_(backbone.parameters(), 5)` and the
recursive PolynomialLRWarmup, stepped after every optimizer step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from tests.torch_reference import IRESNET_BLOCKS, MBF, ConvBlock, DepthWise, IBasicBlock, Residual


def scaled(channels: int, width: float) -> int:
    """A channel count times `width`, rounded to a multiple of 8 (at least 8): how the narrow test models are built."""
    return channels if width == 1.0 else max(8, round(channels * width / 8) * 8)


class IResNet(nn.Module):
    """arcface_torch's iresnet with every channel count scaled by `width`; gamma of `features` frozen at its value."""

    def __init__(self, blocks: tuple[int, ...], num_features: int, width: float):
        super().__init__()
        planes = [scaled(c, width) for c in (64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(3, planes[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes[0])
        self.prelu = nn.PReLU(planes[0])
        inplanes = planes[0]
        for index, (stage, count) in enumerate(zip(planes, blocks, strict=True), start=1):
            layers = [IBasicBlock(inplanes, stage, 2)] + [IBasicBlock(stage, stage) for _ in range(count - 1)]
            setattr(self, f"layer{index}", nn.Sequential(*layers))
            inplanes = stage
        self.bn2 = nn.BatchNorm2d(inplanes)
        self.fc = nn.Linear(inplanes * 7 * 7, num_features)
        self.features = nn.BatchNorm1d(num_features)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False  # arcface_torch: gamma frozen, beta trained

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.features(self.fc(torch.flatten(self.bn2(x), 1)))


class GDC(nn.Module):
    def __init__(self, channels: int, num_features: int):
        super().__init__()
        self.layers = nn.Sequential(ConvBlock(channels, channels, 7, groups=channels, activation=False), nn.Flatten(),
                                    nn.Linear(channels, num_features, bias=False), nn.BatchNorm1d(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class MobileFaceNet(nn.Module):
    """arcface_torch's MobileFaceNet with every channel count scaled by `width`."""

    def __init__(self, blocks: tuple[int, int, int, int], scale: int, num_features: int, width: float):
        super().__init__()
        c64, c128 = scaled(64 * scale, width), scaled(128 * scale, width)
        g128, g256, g512 = (scaled(c, width) for c in (128, 256, 512))
        stage0 = (ConvBlock(c64, c64, 3, 1, 1, groups=c64 // scale) if blocks[0] == 1
                  else Residual(c64, blocks[0], g128))
        self.layers = nn.ModuleList([
            ConvBlock(3, c64, 3, 2, 1), stage0,
            DepthWise(c64, c64, g128), Residual(c64, blocks[1], g128),
            DepthWise(c64, c128, g256), Residual(c128, blocks[2], g256),
            DepthWise(c128, c128, g512), Residual(c128, blocks[3], g256)])
        self.conv_sep = ConvBlock(c128, g512)
        self.features = GDC(g512, num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.features(self.conv_sep(x))


def get_scaled_model(name: str, num_features: int, width: float) -> nn.Module:
    if name in IRESNET_BLOCKS:
        return IResNet(IRESNET_BLOCKS[name], num_features, width)
    if name in MBF:
        return MobileFaceNet(*MBF[name], num_features, width)
    raise ValueError(f"unknown network {name!r}")


def arcface_loss(embeddings: torch.Tensor, centres: torch.Tensor, labels: torch.Tensor, s: float = 64.0,
                 m2: float = 0.5) -> torch.Tensor:
    """PartialFC_V2 + CombinedMarginLoss(s, 1, m2, 0) + cross-entropy, mean over the batch.

    The margin is added under no_grad, as arcface_torch does in place (arccos, + m2, cos): the backward sees the
    target logit as s*cos(theta), i.e. d logit / d cos = s.
    """
    cos = F.linear(F.normalize(embeddings), F.normalize(centres)).clamp(-1, 1)
    rows = torch.arange(labels.shape[0])
    with torch.no_grad():
        target = cos[rows, labels]
        shift = torch.zeros_like(cos)
        shift[rows, labels] = torch.cos(torch.arccos(target) + m2) - target
    return F.cross_entropy((cos + shift) * s, labels)


class PolynomialLRWarmup(LRScheduler):
    """arcface_torch's scheduler in its recursive form (the lr of step 0 is the base lr; then warm-up, then decay)."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_iters: int, total_iters: int, power: float = 1.0):
        self.warmup_iters, self.total_iters, self.power = warmup_iters, total_iters, power
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        step, warm, total = self.last_epoch, self.warmup_iters, self.total_iters
        if step == 0 or step > total:
            return [group["lr"] for group in self.optimizer.param_groups]
        if step <= warm:
            return [base * step / warm for base in self.base_lrs]
        factor = ((1.0 - (step - warm) / (total - warm)) / (1.0 - (step - 1 - warm) / (total - warm))) ** self.power
        return [group["lr"] * factor for group in self.optimizer.param_groups]


class ReferenceTrainer:
    """Backbone + centres + SGD + clip + schedule, stepped like train_v2.py (gradient_acc 1, fp32/fp64, one rank)."""

    def __init__(self, backbone: nn.Module, centres: torch.Tensor, lr: float, weight_decay: float,
                 warmup_steps: int, total_steps: int, momentum: float = 0.9, clip: float = 5.0):
        self.backbone, self.clip = backbone.train(), clip
        self.centres = nn.Parameter(centres)
        self.optimizer = torch.optim.SGD([{"params": backbone.parameters()}, {"params": [self.centres]}], lr=lr,
                                         momentum=momentum, weight_decay=weight_decay)
        self.scheduler = PolynomialLRWarmup(self.optimizer, warmup_steps, total_steps)

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
        """One optimizer step on uint8 NHWC RGB images; returns (loss, lr used)."""
        dtype = self.centres.dtype
        x = (images.permute(0, 3, 1, 2).to(dtype) / 255.0 - 0.5) / 0.5
        loss = arcface_loss(self.backbone(x), self.centres, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.backbone.parameters(), self.clip)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.scheduler.step()
        return loss.item(), lr

    def momentum_buffers(self) -> dict[str, torch.Tensor]:
        """Backbone parameter name -> its momentum buffer (parameters that train only)."""
        return {name: self.optimizer.state[p]["momentum_buffer"] for name, p in self.backbone.named_parameters()
                if p.requires_grad and "momentum_buffer" in self.optimizer.state[p]}

    def load_momentum(self, backbone: dict[str, torch.Tensor], centres: torch.Tensor) -> None:
        params = dict(self.backbone.named_parameters())
        for name, value in backbone.items():
            self.optimizer.state[params[name]]["momentum_buffer"] = value.clone()
        self.optimizer.state[self.centres]["momentum_buffer"] = centres.clone()
