"""PyTorch reference of arcface_torch's face ViT, written from its published architecture (not its code).

Module names reproduce arcface_torch's state_dict keys (`patch_embed.proj`, `pos_embed`, `blocks.i.attn.qkv`,
`feature.0..3`, `mask_token`, ...; listed with r2060's in tests/reference/arcface_torch_vit_state_dicts.json).
The masking noise can be passed in, so a training-mode forward can be compared with Paddle's on the same tokens.

    python -m tests.torch_vit_reference   # rewrites tests/reference/arcface_torch_vit_state_dicts.json
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from tests.torch_reference import IResNet
from tests.torch_reference import randomize as randomize_convs_and_norms

# name -> (embed_dim, depth, drop_path_rate, masks 10% of the tokens in training)
VITS = {"vit_t": (256, 12, 0.1, True), "vit_t_dp005_mask0": (256, 12, 0.05, False),
        "vit_s": (512, 12, 0.1, True), "vit_s_dp005_mask_0": (512, 12, 0.05, False),
        "vit_b": (512, 24, 0.1, True), "vit_b_dp005_mask_005": (512, 24, 0.05, True),
        "vit_l_dp005_mask_005": (768, 24, 0.05, True), "vit_h": (1024, 48, 0.1, False)}
REFERENCE = Path(__file__).resolve().parent / "reference" / "arcface_torch_vit_state_dicts.json"
TOKENS = 144  # (112 // 9) ** 2
R2060_BLOCKS = (3, 128, 896, 3)  # arcface_torch's backbones/iresnet2060.py


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int = 8):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).unbind(2)  # each [b, n, heads, hd]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        weights = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.clamp(self.fc1(x), 0.0, 6.0))


class Block(nn.Module):
    def __init__(self, dim: int, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim)
        self.drop_path = drop_path

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_path == 0:
            return x
        keep = 1 - self.drop_path
        return x * torch.bernoulli(torch.full((x.shape[0], 1, 1), keep)) / keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self._drop(self.attn(self.norm1(x)))
        return x + self._drop(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=9, stride=9)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class FaceViT(nn.Module):
    def __init__(self, dim: int, depth: int, drop_path: float, masks: bool, num_features: int = 512):
        super().__init__()
        self.masks = masks
        self.patch_embed = PatchEmbed(dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, TOKENS, dim))
        self.blocks = nn.ModuleList(Block(dim, drop_path * i / max(depth - 1, 1)) for i in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.feature = nn.Sequential(nn.Linear(TOKENS * dim, dim, bias=False), nn.BatchNorm1d(dim, eps=2e-5),
                                     nn.Linear(dim, num_features, bias=False), nn.BatchNorm1d(num_features, eps=2e-5))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """`noise` [B, 144] picks the kept tokens in training (lowest 129 per sample); drawn if not given."""
        x = self.patch_embed(x) + self.pos_embed
        b, n, d = x.shape
        masked = self.training and self.masks
        if masked:
            order = torch.argsort(torch.rand(b, n) if noise is None else noise, dim=1)
            kept = order[:, :int(n * 0.9)].unsqueeze(-1).expand(-1, -1, d)
            x = torch.gather(x, 1, kept)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        if masked:  # kept tokens back at their places, the mask token everywhere else
            x = self.mask_token.expand(b, n, d).scatter(1, kept, x)
        return self.feature(x.reshape(b, n * d))


def get_torch_vit(name: str, num_features: int = 512, width_dim: int | None = None) -> FaceViT:
    """arcface_torch's `name`; `width_dim` replaces the embedding dimension (small models for tests)."""
    dim, depth, drop_path, masks = VITS[name]
    return FaceViT(width_dim or dim, depth, drop_path, masks, num_features)


def randomize(model: FaceViT, seed: int = 0) -> FaceViT:
    """Every tensor random (LayerNorms, pos_embed and mask_token too), BatchNorm statistics calibrated; eval mode."""
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.uniform_(-0.2, 0.2, generator=generator)
        model.pos_embed.normal_(0.0, 0.5, generator=generator)
        model.mask_token.normal_(0.0, 0.5, generator=generator)
    return randomize_convs_and_norms(model, seed)


def state_dict_listing(model: nn.Module) -> dict:
    entries = [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in model.state_dict().items()]
    return {"params": sum(p.numel() for p in model.parameters()), "state_dict": entries}


def write_reference(path: Path = REFERENCE) -> None:
    models = {}
    with torch.device("meta"):  # shapes only: r2060 would allocate 4 GB
        for name in VITS:
            models[name] = state_dict_listing(get_torch_vit(name))
        models["r2060"] = state_dict_listing(IResNet(R2060_BLOCKS))
    source = ("arcface_torch backbones.get_model(name, num_features=512) for its ViTs and r2060, listed from "
              "tests/torch_vit_reference.py and tests/torch_reference.py, torch state_dict order")
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"source": source, "models": models}) + "\n")


if __name__ == "__main__":
    write_reference()
