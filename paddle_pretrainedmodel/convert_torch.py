"""Convert an arcface_torch backbone (.pth state_dict or training checkpoint) to a Paddle .pdparams.

    python paddle_pretrainedmodel/convert_torch.py --network r50 --input backbone.pth --output backbone.pdparams

Names map one to one except where Paddle's naming differs: BatchNorm running_mean/running_var -> _mean/_variance,
num_batches_tracked is dropped, Linear weights are transposed ([out, in] -> [in, out]). Every key and shape is
checked against the Paddle model before anything is written, so a wrong --network or a damaged file fails with
the list of offending keys instead of producing a half-loaded model. torch is imported only to read the file.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the project root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from config import CHOICES
from utils.cli import start_program

NETWORKS = CHOICES["network"]

_RENAMES = {"running_mean": "_mean", "running_var": "_variance"}
_SHOWN = 8  # keys listed per category in an error message


class ConversionError(ValueError):
    """The torch weights do not describe the requested network."""


def paddle_layout(network: str, **model_kwargs: Any) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """(name -> shape of every entry of the Paddle model's state_dict, names of Linear weights).

    Built under paddle.LazyGuard, so even r2060 allocates no parameter memory. `model_kwargs` go to get_model
    (num_features, width: the small models of tests).
    """
    import paddle
    from paddle import nn

    from backbones import get_model

    with paddle.LazyGuard():
        model = get_model(network, **model_kwargs)
    shapes = {name: tuple(value.shape) for name, value in model.state_dict().items()}
    linear = {f"{name}.weight" for name, layer in model.named_sublayers() if isinstance(layer, nn.Linear)}
    return shapes, linear


def paddle_name(torch_name: str) -> str | None:
    """The Paddle state_dict name of a torch state_dict entry (None for torch-only bookkeeping)."""
    prefix, _, leaf = torch_name.rpartition(".")
    if leaf == "num_batches_tracked":
        return None
    return f"{prefix}.{_RENAMES[leaf]}" if leaf in _RENAMES else torch_name


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; torch itself is not imported here
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _listing(title: str, items: list[str]) -> str:
    more = f" ... and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return f"{len(items)} {title}: {', '.join(items[:_SHOWN])}{more}"


def convert_state_dict(torch_sd: Mapping[str, Any], network: str, **model_kwargs: Any) -> dict[str, np.ndarray]:
    """Map an arcface_torch state_dict (tensors or arrays) to Paddle names/layouts; float32 arrays.

    Raises ConversionError listing missing, unexpected and shape-mismatched keys if the weights are not
    exactly `network`'s.
    """
    if network not in NETWORKS:
        raise ConversionError(f"unknown network {network!r}; choose one of {', '.join(NETWORKS)}")
    shapes, linear = paddle_layout(network, **model_kwargs)
    converted: dict[str, np.ndarray] = {}
    seen: set[str] = set()
    unexpected, mismatched = [], []
    for torch_name, value in torch_sd.items():
        name = paddle_name(torch_name)
        if name is None:
            continue
        if name not in shapes:
            unexpected.append(torch_name)
            continue
        seen.add(name)
        array = _to_numpy(value)
        expected = shapes[name][::-1] if name in linear else shapes[name]  # in torch's layout
        if array.shape != expected:
            mismatched.append(f"{torch_name} {list(array.shape)} (expected {list(expected)})")
            continue
        converted[name] = np.ascontiguousarray(array.T if name in linear else array, dtype=np.float32)
    missing = [name for name in shapes if name not in seen]
    problems = [_listing(title, items) for title, items in
                (("missing", missing), ("unexpected", unexpected), ("with wrong shape", mismatched)) if items]
    if problems:
        raise ConversionError(f"the weights are not an arcface_torch {network}: " + "; ".join(problems))
    return converted


def read_torch_state_dict(path: str | Path) -> dict[str, Any]:
    """Load a .pth safely (weights_only) and return the backbone state_dict.

    Accepts a bare state_dict or an arcface_torch training checkpoint holding `state_dict_backbone`, and strips
    the `module.` prefix DistributedDataParallel adds.
    """
    import torch  # only the converter needs torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or a pickle that needs code to load
        raise ConversionError(f"{path}: cannot read as a torch state_dict ({type(e).__name__}: {e})") from e
    if isinstance(obj, Mapping) and "state_dict_backbone" in obj:
        obj = obj["state_dict_backbone"]
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) for k in obj):
        raise ConversionError(f"{path}: expected a state_dict (name -> tensor), found {type(obj).__name__}")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def main(argv: list[str] | None = None) -> int:
    start_program()  # before paddle is imported
    from utils.checkpoint import save_paddle_atomic

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--network", required=True, choices=NETWORKS, help="backbone the weights belong to")
    parser.add_argument("--input", required=True, type=Path, help="arcface_torch backbone.pth or checkpoint .pt")
    parser.add_argument("--output", required=True, type=Path, help="where to write the .pdparams")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output")
    args = parser.parse_args(argv)
    if args.output.exists() and not args.force:
        parser.exit(1, f"error: {args.output} exists (use --force to overwrite)\n")
    if not args.output.parent.is_dir():
        parser.exit(1, f"error: output directory {args.output.parent} does not exist\n")
    try:
        state = convert_state_dict(read_torch_state_dict(args.input), args.network)
    except ConversionError as e:
        parser.exit(1, f"error: {e}\n")
    save_paddle_atomic(state, args.output)
    count = sum(int(np.prod(v.shape)) for k, v in state.items() if not k.endswith(("_mean", "_variance")))
    print(f"wrote {args.output}: {args.network}, {len(state)} tensors, {count:,} parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
