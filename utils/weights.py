"""Loading backbone weights from a .pdparams file: safely, and whole or not at all."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from paddle import nn

from utils.safe_pickle import load_paddle_state


def load_weights(model: nn.Layer, path: str | Path, name: str = "this backbone") -> nn.Layer:
    """Load `path` into `model` through the restricted unpickler; every key and shape must match.

    A partial load would give a silently wrong model, so any missing, unexpected or mis-shaped key fails with
    one line listing them (`name` says what the model is, e.g. "r50 (width 1.0, embedding 512)").
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: backbone weights not found")
    state = load_paddle_state(path)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [f"{k} {tuple(np.shape(state[k]))} != {expected[k]}"
                   for k in sorted(set(expected) & set(state)) if tuple(np.shape(state[k])) != expected[k]]
    if missing or unexpected or wrong_shape:
        def few(items: list[str]) -> str:
            return ", ".join(items[:5]) + (f" ... (+{len(items) - 5})" if len(items) > 5 else "")

        problems = [f"{kind}: {few(items)}" for kind, items in
                    (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)) if items]
        raise ValueError(f"{path}: not a {name} state dict -- " + "; ".join(problems)
                         + " (another network, width or embedding size?)")
    model.set_state_dict({k: np.asarray(v) for k, v in state.items()})
    return model
