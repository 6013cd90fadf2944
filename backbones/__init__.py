"""Face-recognition backbones with arcface_torch's architectures and state_dict names.

    model = get_model("r50")          # NCHW float32 [B, 3, 112, 112] -> [B, 512] (not normalised)
"""

from __future__ import annotations

from paddle import nn

from utils.weights import load_weights

from .iresnet import STAGE_BLOCKS, IResNet, iresnet
from .mobilefacenet import ARCHITECTURES, MobileFaceNet, mobilefacenet
from .vit import ARCHITECTURES as VIT_ARCHITECTURES
from .vit import VisionTransformer, vit

NETWORKS = (*STAGE_BLOCKS, *ARCHITECTURES, *VIT_ARCHITECTURES)
DATA_FORMATS = ("NCHW", "NHWC")

__all__ = ["DATA_FORMATS", "NETWORKS", "IResNet", "MobileFaceNet", "VisionTransformer", "get_model", "load_weights"]


def get_model(name: str, num_features: int = 512, fp16: bool = False, dropout: float = 0.0,
              width: float = 1.0, recompute: bool = False, data_format: str = "NCHW") -> nn.Layer:
    """Build backbone `name` (r18 ... r200, r2060, mbf, mbf_large, vit_t ... vit_h: arcface_torch's names).

    width 1.0 is arcface_torch's exact architecture; smaller widths scale every channel count (tiny models for
    tests and the quick start; a ViT's embedding dimension). fp16 runs the body under AMP on GPU and keeps the
    embedding layers in fp32. recompute (training only) keeps the inputs of ViT blocks or iresnet stage segments
    and recomputes the rest in backward: less memory for ~1/3 more compute. data_format "NHWC" (convolutional
    networks) keeps activations channels-last; parameters, state dict and the NCHW input stay the same.
    """
    if not 0.0 < width <= 4.0:
        raise ValueError(f"width must be in (0, 4], got {width}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if data_format not in DATA_FORMATS:
        raise ValueError(f"data_format must be NCHW or NHWC, got {data_format!r}")
    if data_format == "NHWC" and name in VIT_ARCHITECTURES:
        raise ValueError(f"data_format NHWC is for the convolutional networks (iresnets, mbf); {name} has none")
    if name in STAGE_BLOCKS:
        return iresnet(name, num_features=num_features, dropout=dropout, fp16=fp16, width=width, recompute=recompute,
                       data_format=data_format)
    if dropout and name in NETWORKS:
        raise ValueError(f"dropout is only used by the iresnets; {name} has none (got dropout={dropout})")
    if name in ARCHITECTURES:
        if recompute:
            raise ValueError(f"recompute is for the iresnets and ViTs; {name} is small enough without it")
        return mobilefacenet(name, num_features=num_features, fp16=fp16, width=width, data_format=data_format)
    if name in VIT_ARCHITECTURES:
        return vit(name, num_features=num_features, fp16=fp16, width=width, recompute=recompute)
    raise ValueError(f"unknown network {name!r}; choose one of {', '.join(NETWORKS)}")
