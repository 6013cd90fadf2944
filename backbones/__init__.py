"""Face-recognition backbones with arcface_torch's architectures and state_dict names.

    model = get_model("r50")          # NCHW float32 [B, 3, 112, 112] -> [B, 512] (not normalised)
"""

from __future__ import annotations

from paddle import nn

from .iresnet import STAGE_BLOCKS, IResNet, iresnet
from .mobilefacenet import ARCHITECTURES, MobileFaceNet, mobilefacenet
from .weights import load_weights

NETWORKS = (*STAGE_BLOCKS, *ARCHITECTURES)

__all__ = ["NETWORKS", "IResNet", "MobileFaceNet", "get_model", "load_weights"]


def get_model(name: str, num_features: int = 512, fp16: bool = False, dropout: float = 0.0,
              width: float = 1.0) -> nn.Layer:
    """Build backbone `name` (r18 r34 r50 r100 r200 mbf mbf_large).

    width 1.0 is arcface_torch's exact architecture; smaller widths scale every channel count (tiny models for
    tests and the quick start). fp16 runs the body under AMP on GPU and keeps the embedding layers in fp32.
    """
    if not 0.0 < width <= 4.0:
        raise ValueError(f"width must be in (0, 4], got {width}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if name in STAGE_BLOCKS:
        return iresnet(name, num_features=num_features, dropout=dropout, fp16=fp16, width=width)
    if name in ARCHITECTURES:
        if dropout:
            raise ValueError(f"dropout is only used by the iresnets; {name} has none (got dropout={dropout})")
        return mobilefacenet(name, num_features=num_features, fp16=fp16, width=width)
    raise ValueError(f"unknown network {name!r}; choose one of {', '.join(NETWORKS)}")
