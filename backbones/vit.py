"""The face Vision Transformer of arcface_torch (`backbones/vit.py`) with its state_dict names.

112x112 input cut into 9x9 patches by a strided conv (`patch_embed.proj`: 12x12 = 144 tokens, the last 4 pixel
rows and columns unused), plus a learned `pos_embed`; pre-norm blocks (LayerNorm, 8-head attention without qkv
bias, LayerNorm, MLP 4x with ReLU6), stochastic depth rising linearly to `drop_path_rate` over the blocks; a final
LayerNorm; then the whole token grid, flattened, goes through the `feature` head: Linear(144*D -> D, no bias),
BatchNorm1d(D, eps 2e-5), Linear(D -> num_features, no bias), BatchNorm1d(num_features, eps 2e-5).

Training only: random patch masking drops a random 10% of the tokens of each sample before the blocks and puts
the learned `mask_token` back at their places after the final norm, so the head always sees 144 tokens; and drop
path. arcface_torch calls its `random_masking` without passing the model's `mask_ratio`, so every variant with
a non-zero ratio (0.1 or 0.05 in its name) drops 10% of the tokens; this follows it. Eval is deterministic.
"""

from __future__ import annotations

import math

import paddle
from paddle import nn
from paddle.autograd import PyLayer

from .layers import BatchNorm1D, scaled_channels
from .recompute import run_checkpointed

IMAGE_SIZE = 112
PATCH_SIZE = 9
NUM_HEADS = 8
MLP_RATIO = 4
MASKED_FRACTION = 0.1  # what arcface_torch's random_masking drops whatever the configured ratio (see above)

# name -> (embed_dim, depth, drop_path_rate, masking), as arcface_torch's get_model builds them
ARCHITECTURES = {
    "vit_t": (256, 12, 0.1, True),
    "vit_t_dp005_mask0": (256, 12, 0.05, False),
    "vit_s": (512, 12, 0.1, True),
    "vit_s_dp005_mask_0": (512, 12, 0.05, False),
    "vit_b": (512, 24, 0.1, True),
    "vit_b_dp005_mask_005": (512, 24, 0.05, True),
    "vit_l_dp005_mask_005": (768, 24, 0.05, True),
    "vit_h": (1024, 48, 0.1, False),
}


def _trunc_normal_attr() -> paddle.ParamAttr:
    """timm's trunc_normal_(std=0.02) (cut at +-2, i.e. 100 std: a plain normal in practice)."""
    return paddle.ParamAttr(initializer=nn.initializer.TruncatedNormal(0.0, 0.02, a=-2.0, b=2.0))


class _TokenLinear(PyLayer):
    """x @ W + b over the flattened tokens, the bias gradient as a product with a ones row.

    Paddle's Linear on [B, N, D] sums its bias gradient with a reduction kernel that costs more than the dW product
    (35 vs 24 ms for [32, 129, 1024], 1 thread) and adds the bias in a separate pass; here the bias rides in the
    GEMM (addmm) and its gradient is one more GEMM. Forward + backward of Linear(256 -> 1024) on [32, 129, 256]:
    152 -> 94 ms, torch's time; outputs and gradients equal Paddle's (tests/test_vit.py).
    """

    @staticmethod
    def forward(ctx, x: paddle.Tensor, weight: paddle.Tensor, bias: paddle.Tensor | None) -> paddle.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.bias = None if bias is None else not bias.stop_gradient  # None: no bias; else whether it trains
        flat = x.reshape([-1, x.shape[-1]])
        out = paddle.matmul(flat, weight) if bias is None else paddle.addmm(bias.unsqueeze(0), flat, weight)
        return out.reshape([*x.shape[:-1], weight.shape[1]])

    @staticmethod
    def backward(ctx, grad: paddle.Tensor) -> tuple[paddle.Tensor | None, ...]:
        x, weight = ctx.saved_tensor()
        g = grad.reshape([-1, grad.shape[-1]])
        grad_x = None if x.stop_gradient else paddle.matmul(g, weight, transpose_y=True).reshape(x.shape)
        grad_w = None if weight.stop_gradient else paddle.matmul(x.reshape([-1, x.shape[-1]]), g, transpose_x=True)
        if ctx.bias is None:
            return grad_x, grad_w
        grad_b = paddle.matmul(paddle.ones([1, g.shape[0]], g.dtype), g).reshape([-1]) if ctx.bias else None
        return grad_x, grad_w, grad_b


class Linear(nn.Linear):
    """nn.Linear (same parameters and names) running `_TokenLinear` in float32 CPU dygraph; F.linear elsewhere
    (GPU, AMP, static graphs and export). Switch `Linear.fast_on_cpu` off to compare."""

    fast_on_cpu = True

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        if self.fast_on_cpu and paddle.in_dynamic_mode() and x.place.is_cpu_place() and x.dtype == paddle.float32:
            return _TokenLinear.apply(x, self.weight, self.bias)
        return nn.functional.linear(x, self.weight, self.bias)  # not super(): dy2static (export) loses its cell


def _linear(in_features: int, out_features: int, bias: bool = True) -> Linear:
    zero = paddle.ParamAttr(initializer=nn.initializer.Constant(0.0))
    return Linear(in_features, out_features, weight_attr=_trunc_normal_attr(), bias_attr=zero if bias else False)


def drop_path(x: paddle.Tensor, rate: float, training: bool) -> paddle.Tensor:
    """Stochastic depth: zero the residual branch of whole samples with probability `rate`, scale the rest."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = paddle.floor(keep + paddle.rand([x.shape[0]] + [1] * (x.ndim - 1), dtype=x.dtype))
    return x * (mask / keep)


class Attention(nn.Layer):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = _linear(dim, dim * 3, bias=False)
        self.proj = _linear(dim, dim)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        dim = x.shape[-1]
        # [B, N, 3, heads, head_dim] -> [3, B, heads, N, head_dim]; 0 keeps a dimension (dynamic batch in export)
        qkv = self.qkv(x).reshape([0, 0, 3, self.num_heads, dim // self.num_heads]).transpose([2, 0, 3, 1, 4])
        q, k, v = (t.astype("float32") for t in paddle.unbind(qkv, axis=0))  # attention in fp32 under AMP too
        attn = nn.functional.softmax(paddle.matmul(q, k, transpose_y=True) * self.scale, axis=-1)
        out = paddle.matmul(attn, v).transpose([0, 2, 1, 3]).reshape([0, 0, dim])
        return self.proj(out.astype(x.dtype))

    @staticmethod
    def matmul_macs(tokens: int, dim: int) -> int:
        """Multiply-adds of q @ k^T and attn @ v for one sample (not seen by Linear/Conv hooks)."""
        return 2 * tokens * tokens * dim


class Mlp(nn.Layer):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = _linear(dim, hidden)
        self.fc2 = _linear(hidden, dim)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.fc2(nn.functional.relu6(self.fc1(x)))


class Block(nn.Layer):
    def __init__(self, dim: int, num_heads: int, drop_path_rate: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, epsilon=1e-5)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, epsilon=1e-5)
        self.mlp = Mlp(dim, dim * MLP_RATIO)
        self.drop_path_rate = drop_path_rate

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path_rate, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path_rate, self.training)


class PatchEmbed(nn.Layer):
    def __init__(self, dim: int):
        super().__init__()
        fan_in = 3 * PATCH_SIZE * PATCH_SIZE  # torch's Conv2d default: U(+-1/sqrt(fan_in)) for weight and bias
        bound = 1.0 / math.sqrt(fan_in)
        uniform = paddle.ParamAttr(initializer=nn.initializer.Uniform(-bound, bound))
        uniform_bias = paddle.ParamAttr(initializer=nn.initializer.Uniform(-bound, bound))
        self.proj = nn.Conv2D(3, dim, PATCH_SIZE, stride=PATCH_SIZE, weight_attr=uniform, bias_attr=uniform_bias)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.proj(x).flatten(2).transpose([0, 2, 1])  # [B, D, 12, 12] -> [B, 144, D]


def _feature_batch_norm(features: int) -> BatchNorm1D:
    """torch BatchNorm1d(features, eps=2e-5): momentum 0.1 and unbiased running variance (layers.BatchNorm1D)."""
    return BatchNorm1D(features, momentum=0.9, epsilon=2e-5)


class VisionTransformer(nn.Layer):
    def __init__(self, embed_dim: int, depth: int, drop_path_rate: float, masking: bool, num_features: int = 512,
                 fp16: bool = False, recompute: bool = False):
        super().__init__()
        self.fp16 = fp16
        self.recompute = recompute
        self.embed_dim = embed_dim
        self.num_patches = (IMAGE_SIZE // PATCH_SIZE) ** 2
        self.mask_fraction = MASKED_FRACTION if masking else 0.0
        self.patch_embed = PatchEmbed(embed_dim)
        self.pos_embed = self.create_parameter([1, self.num_patches, embed_dim],
                                               default_initializer=nn.initializer.TruncatedNormal(0.0, 0.02))
        rates = [drop_path_rate * i / (depth - 1) for i in range(depth)] if depth > 1 else [0.0]
        self.blocks = nn.LayerList([Block(embed_dim, NUM_HEADS, rate) for rate in rates])
        self.norm = nn.LayerNorm(embed_dim, epsilon=1e-5)
        self.feature = nn.Sequential(
            _linear(embed_dim * self.num_patches, embed_dim, bias=False), _feature_batch_norm(embed_dim),
            _linear(embed_dim, num_features, bias=False), _feature_batch_norm(num_features))
        self.mask_token = self.create_parameter([1, 1, embed_dim], default_initializer=nn.initializer.Normal(0.0, 0.02))

    def mask_noise(self, batch: int) -> paddle.Tensor:
        """Uniform noise whose per-sample argsort picks the kept tokens (a method so tests can fix it)."""
        return paddle.rand([batch, self.num_patches])

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        masked = self.training and self.mask_fraction > 0
        with paddle.amp.auto_cast(enable=self.fp16):
            x = self.patch_embed(x) + self.pos_embed
            if masked:
                order = paddle.argsort(self.mask_noise(x.shape[0]), axis=1)  # ascending: the first ones are kept
                restore = paddle.argsort(order, axis=1)
                kept = int(self.num_patches * (1 - self.mask_fraction))
                x = paddle.take_along_axis(x, order[:, :kept].unsqueeze(-1), axis=1, broadcast=True)
            for block in self.blocks:
                x = run_checkpointed([block], x) if self.recompute and self.training else block(x)
        x = self.norm(x.astype("float32"))
        if masked:
            tokens = self.mask_token.expand([x.shape[0], self.num_patches - x.shape[1], self.embed_dim])
            x = paddle.take_along_axis(paddle.concat([x, tokens], axis=1), restore.unsqueeze(-1), axis=1,
                                       broadcast=True)
        return self.feature(x.reshape([0, self.num_patches * self.embed_dim]))


def vit(name: str, num_features: int = 512, fp16: bool = False, width: float = 1.0,
        recompute: bool = False) -> VisionTransformer:
    """arcface_torch's `name`; width < 1 scales the embedding dimension (multiples of 8: 8 heads stay whole)."""
    embed_dim, depth, drop_path_rate, masking = ARCHITECTURES[name]
    return VisionTransformer(scaled_channels(embed_dim, width), depth, drop_path_rate, masking,
                             num_features=num_features, fp16=fp16, recompute=recompute)
