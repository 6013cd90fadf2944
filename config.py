"""Every training setting in one place: defaults, named presets, command-line overrides.

`DEFAULTS` holds the key names every module reads (`cfg.network`, `cfg.batch_size`, ...). A preset is a
small dict of changes to DEFAULTS; the command line changes any key on top of it. Types come from
DEFAULTS (or `_NONE_TYPES` for keys whose default is None), so `--batch_size 64` is an int and
`--fp16 true` a bool; a mistyped or unknown key is an error that names it. Importing this module does
not import paddle.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

DEFAULTS: dict[str, Any] = {
    # model
    "network": "mbf",            # r18 r34 r50 r100 r200 r2060 mbf mbf_large vit_t ... vit_h (CHOICES)
    "width": 1.0,                # channel-width multiplier (1.0 = arcface_torch's architecture)
    "embedding_size": 512,
    "dropout": 0.0,
    "recompute": False,          # activation recompute over ViT blocks / iresnet stage segments (less memory)
    "fp16": False,               # AMP fp16 with dynamic loss scaling (GPU only; ignored with a note on CPU)
    "to_static": False,          # compile the backbone's forward with paddle.jit.to_static (same gradients)
    "data_format": "NCHW",       # NCHW | NHWC activations (NHWC: channels-last, same parameters, NCHW input)
    # loss / head
    "loss": "arcface",           # arcface | cosface | combined
    "margin_s": 64.0,
    "margin_m1": 1.0,
    "margin_m2": 0.5,
    "margin_m3": 0.0,
    "margin_grad": "straight_through",  # straight_through (arcface_torch) | exact
    "interclass_filtering_threshold": 0.0,
    "sample_rate": 1.0,
    "pfc_backend": "auto",       # Partial FC head: auto (paddle on GPU, numpy on CPU) | numpy | paddle
    "pfc_kernel": "portable",    # paddle backend: portable | fused (GPU margin_cross_entropy, checked at step 1)
    # optimisation
    "optimizer": "sgd",          # sgd | adamw
    "lr": 0.1,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "num_epoch": 20,
    "warmup_epoch": 0,
    "batch_size": 128,           # per rank
    "gradient_acc": 1,
    "clip_grad_norm": 5.0,
    "max_bad_steps": 5,          # stop after this many consecutive NaN/Inf losses (without AMP)
    # data
    "data": "synthetic",         # a directory with train.rec/train.idx, an image folder, or "synthetic"
    "num_classes": None,         # None: read from the dataset
    "num_image": None,           # expected image count (a check; None: whatever the dataset holds)
    "num_workers": 2,
    "seed": 2048,
    "cache_dir": ".cache",       # where the built-in synthetic set is generated on first use
    "synthetic_identities": 1000,
    "synthetic_images_per_id": 20,
    "synthetic_val_pairs": 1000,
    # evaluation / output
    "val_targets": [],           # names of .bin files in the data directory, e.g. ["lfw", "cfp_fp", "agedb_30"]
    "val_every": 2000,
    "val_at_start": False,       # also evaluate the untrained model
    "val_batch_size": 64,
    "log_every": 10,
    "save_every": 0,             # checkpoint every N optimizer steps (0: only at the end)
    "keep_checkpoints": 3,
    "output": "work_dirs",
    "run_name": None,            # None: the preset name
    "resume": None,              # "latest" (also plain `--resume`) or a checkpoint / run directory
    "init_backbone": None,       # .pdparams to start a NEW run from (fine-tuning; the head starts fresh)
    "stop_at_step": 0,           # stop early after this optimizer step (the schedule still spans num_epoch)
    "threads": 0,                # CPU threads per rank (0: cores / ranks on this node)
}

# Types of the keys whose default is None (None stays allowed: `--num_classes none`).
_NONE_TYPES: dict[str, type] = {"num_classes": int, "num_image": int, "run_name": str, "resume": str,
                                "init_backbone": str}

CHOICES: dict[str, tuple[str, ...]] = {
    "network": ("r18", "r34", "r50", "r100", "r200", "r2060", "mbf", "mbf_large", "vit_t", "vit_t_dp005_mask0",
                "vit_s", "vit_s_dp005_mask_0", "vit_b", "vit_b_dp005_mask_005", "vit_l_dp005_mask_005", "vit_h"),
    "loss": ("arcface", "cosface", "combined"),
    "margin_grad": ("straight_through", "exact"),
    "optimizer": ("sgd", "adamw"),
    "pfc_backend": ("auto", "numpy", "paddle"),
    "pfc_kernel": ("portable", "fused"),
    "data_format": ("NCHW", "NHWC"),
}

_ARCFACE_VAL = ["lfw", "cfp_fp", "agedb_30"]
_MS1MV2 = {"data": "datasets/faces_emore", "num_classes": 85742, "num_image": 5822653}
_MS1MV3 = {"data": "datasets/ms1m-retinaface-t1", "num_classes": 93431, "num_image": 5179510}
_GLINT360K = {"data": "datasets/glint360k", "num_classes": 360232, "num_image": 17091657}
_WF4M = {"data": "datasets/WebFace4M", "num_classes": 205990, "num_image": 4235242}
_WF12M = {"data": "datasets/WebFace12M", "num_classes": 617970, "num_image": 12720066}
_WF42M = {"data": "datasets/WebFace42M", "num_classes": 2059906, "num_image": 42474557}
_COSFACE = {"loss": "cosface", "margin_m1": 1.0, "margin_m2": 0.0, "margin_m3": 0.4}
# arcface_torch's WebFace42M ViT recipes: AdamW, lr 1e-3 with num_epoch // 10 warm-up epochs, Partial FC 0.3.
_VIT_WF42M = {**_WF42M, **_COSFACE, "optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.1, "sample_rate": 0.3,
              "num_epoch": 40, "warmup_epoch": 4, "val_targets": []}
# arcface_torch's published recipes (configs/*.py; its lr is for 8 GPUs x 128): fp16 on, SGD, no warm-up.
_ARCFACE_TORCH = {"fp16": True, "batch_size": 128, "lr": 0.1, "momentum": 0.9, "num_epoch": 20, "warmup_epoch": 0,
                  "sample_rate": 1.0, "embedding_size": 512, "val_targets": _ARCFACE_VAL, "val_every": 2000,
                  "log_every": 10, "save_every": 2000}

PRESETS: dict[str, dict[str, Any]] = {
    # Quick start: the built-in synthetic set and a quarter-width MobileFaceNet, a few minutes on 2 CPU cores.
    "synthetic": {"network": "mbf", "width": 0.25, "embedding_size": 128, "batch_size": 64, "lr": 0.1,
                  "weight_decay": 5e-4, "num_epoch": 6, "warmup_epoch": 0, "synthetic_identities": 100,
                  "synthetic_images_per_id": 16, "synthetic_val_pairs": 600, "val_targets": ["synth_val"],
                  "val_at_start": True, "val_every": 0, "log_every": 10, "num_workers": 2},
    "ms1mv2_r50": {**_ARCFACE_TORCH, **_MS1MV2, "network": "r50", "loss": "arcface", "weight_decay": 5e-4},
    "ms1mv3_r50": {**_ARCFACE_TORCH, **_MS1MV3, "network": "r50", "loss": "arcface", "weight_decay": 5e-4},
    "ms1mv3_r100": {**_ARCFACE_TORCH, **_MS1MV3, "network": "r100", "loss": "arcface", "weight_decay": 5e-4},
    "ms1mv3_mbf": {**_ARCFACE_TORCH, **_MS1MV3, "network": "mbf", "loss": "arcface", "weight_decay": 1e-4,
                   "num_epoch": 40},
    "glint360k_r100": {**_ARCFACE_TORCH, **_GLINT360K, "network": "r100", "loss": "cosface", "margin_m1": 1.0,
                       "margin_m2": 0.0, "margin_m3": 0.4, "weight_decay": 1e-4},
    "glint360k_r50": {**_ARCFACE_TORCH, **_GLINT360K, **_COSFACE, "network": "r50", "weight_decay": 1e-4},
    "glint360k_mbf": {**_ARCFACE_TORCH, **_GLINT360K, **_COSFACE, "network": "mbf", "weight_decay": 1e-4},
    "wf4m_r50": {**_ARCFACE_TORCH, **_WF4M, **_COSFACE, "network": "r50", "weight_decay": 5e-4},
    "wf12m_r50": {**_ARCFACE_TORCH, **_WF12M, **_COSFACE, "network": "r50", "weight_decay": 5e-4, "val_targets": []},
    "wf42m_pfc02_r100": {**_ARCFACE_TORCH, **_WF42M, **_COSFACE, "network": "r100", "weight_decay": 5e-4,
                         "sample_rate": 0.2, "val_every": 10000},
    "wf42m_pfc03_40epoch_8gpu_vit_t": {**_ARCFACE_TORCH, **_VIT_WF42M, "network": "vit_t_dp005_mask0",
                                       "batch_size": 512},
    # arcface_torch always checkpoints vit_b's blocks: recompute on
    "wf42m_pfc03_40epoch_64gpu_vit_b": {**_ARCFACE_TORCH, **_VIT_WF42M, "network": "vit_b_dp005_mask_005",
                                        "batch_size": 384, "recompute": True},
}
DEFAULT_PRESET = "synthetic"


class ConfigError(ValueError):
    """A setting is unknown, mistyped or out of range; the message names the key."""


class Config:
    """Settings with attribute access (`cfg.lr`) over a plain dict; `preset` names where they came from."""

    def __init__(self, values: dict[str, Any], preset: str = DEFAULT_PRESET) -> None:
        object.__setattr__(self, "_values", dict(values))
        object.__setattr__(self, "preset", preset)

    def __getattr__(self, key: str) -> Any:
        try:
            return self._values[key]
        except KeyError:
            raise AttributeError(f"config has no key {key!r}") from None

    def __setattr__(self, key: str, value: Any) -> None:
        if key not in self._values:
            raise ConfigError(f"unknown config key {key!r}")
        self._values[key] = value

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __contains__(self, key: str) -> bool:
        return key in self._values

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Config) and self._values == other._values

    def __repr__(self) -> str:
        return f"Config(preset={self.preset!r}, {self._values!r})"

    def to_dict(self) -> dict[str, Any]:
        return {"preset": self.preset, **self._values}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    def replace(self, **changes: Any) -> Config:
        """A copy with some keys changed (validated the same way as the command line)."""
        values = dict(self._values)
        for key, value in changes.items():
            values[key] = _coerce(key, value)
        cfg = Config(values, self.preset)
        validate(cfg)
        return cfg


def _key_type(key: str) -> type:
    if key not in DEFAULTS:
        raise ConfigError(f"unknown config key {key!r}")
    default = DEFAULTS[key]
    return _NONE_TYPES[key] if default is None else type(default)


def _parse_bool(key: str, text: str) -> bool:
    low = text.strip().lower()
    if low in ("true", "1", "yes", "on"):
        return True
    if low in ("false", "0", "no", "off"):
        return False
    raise ConfigError(f"--{key}: expected true or false, got {text!r}")


def _coerce(key: str, value: Any) -> Any:
    """Bring a command-line string (or a Python value) to the key's type; raise ConfigError naming the key."""
    kind = _key_type(key)
    if value is None or (isinstance(value, str) and value.lower() == "none"):
        if DEFAULTS[key] is None:
            return None
        raise ConfigError(f"--{key}: cannot be none")
    if kind is list:
        items = value.split(",") if isinstance(value, str) else list(value)
        return [str(s).strip() for s in items if str(s).strip()]
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            return _parse_bool(key, value)
        raise ConfigError(f"--{key}: expected true or false, got {value!r}")
    if kind in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"--{key}: expected {kind.__name__}, got {value!r}")
        try:
            number = float(value) if kind is float else int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"--{key}: expected {kind.__name__}, got {value!r}") from None
        if kind is int and isinstance(value, float) and value != int(value):
            raise ConfigError(f"--{key}: expected int, got {value!r}")
        return number
    return str(value)


def validate(cfg: Config) -> None:
    """Reject values no module could use, naming the key."""
    _check_values(cfg)
    _check_consistency(cfg)


def _check_values(cfg: Config) -> None:
    """Each key on its own: a choice, a sign or a range."""
    for key, allowed in CHOICES.items():
        if cfg[key] not in allowed:
            raise ConfigError(f"--{key}: {cfg[key]!r} is not one of {', '.join(allowed)}")
    positive = ("width", "embedding_size", "batch_size", "gradient_acc", "num_epoch", "margin_s", "log_every",
                "val_batch_size", "max_bad_steps", "keep_checkpoints")
    for key in positive:
        if not cfg[key] > 0:
            raise ConfigError(f"--{key}: must be > 0, got {cfg[key]}")
    for key in ("lr", "weight_decay", "momentum", "warmup_epoch", "num_workers", "val_every", "save_every",
                "stop_at_step", "threads", "clip_grad_norm", "dropout"):
        if cfg[key] < 0:
            raise ConfigError(f"--{key}: must be >= 0, got {cfg[key]}")
    if not 0.0 < cfg.sample_rate <= 1.0:
        raise ConfigError(f"--sample_rate: must be in (0, 1], got {cfg.sample_rate}")


def _check_consistency(cfg: Config) -> None:
    """Keys against each other, optional counts, and names that must mean a place."""
    if cfg.pfc_kernel == "fused" and cfg.pfc_backend == "numpy":
        raise ConfigError("--pfc_kernel: fused runs on the paddle backend, not --pfc_backend numpy")
    if cfg.warmup_epoch >= cfg.num_epoch:
        raise ConfigError(f"--warmup_epoch: must be < num_epoch ({cfg.num_epoch}), got {cfg.warmup_epoch}")
    for key in ("num_classes", "num_image"):
        if cfg[key] is not None and cfg[key] <= 0:
            raise ConfigError(f"--{key}: must be > 0 or none, got {cfg[key]}")
    if cfg.resume is not None and cfg.init_backbone is not None:
        raise ConfigError("--init_backbone: starts a new run and cannot be combined with --resume")
    for key in ("data", "output", "cache_dir"):  # an unset shell variable would mean the current directory
        if not str(cfg[key]).strip():
            raise ConfigError(f"--{key}: empty (an unset shell variable?)")
    name = cfg.run_name
    if name is None or not name.strip() or name in (".", "..") or any(sep in name for sep in ("/", "\\")):
        raise ConfigError(f"--run_name: must name one directory inside --output (no '/', not '.' or '..'), "
                          f"got {name!r}")


def load_config(preset: str = DEFAULT_PRESET, overrides: dict[str, Any] | None = None) -> Config:
    """DEFAULTS, then the preset, then `overrides` (strings or values), validated."""
    if preset not in PRESETS:
        raise ConfigError(f"--config: unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    values = dict(DEFAULTS)
    values.update(PRESETS[preset])
    for key, value in (overrides or {}).items():
        values[key] = _coerce(key, value)
    if values["run_name"] is None:
        values["run_name"] = preset
    cfg = Config(values, preset)
    validate(cfg)
    return cfg


class _OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line (`train.py: error: ...`, exit 2): the usage of 50 keys would bury it."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _build_parser(prog: str) -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog=prog, usage=f"{prog} [--config NAME] [--KEY VALUE ...]", allow_abbrev=False,
        description="Train an ArcFace model. Every config key can be overridden: --KEY VALUE "
                    "(bools true/false, lists comma-separated, 'none' for optional keys). The defaults shown are "
                    "config.py's DEFAULTS; the chosen preset changes some of them (python config.py --config NAME "
                    "prints the result).",
        epilog=f"presets: {', '.join(PRESETS)} (default {DEFAULT_PRESET})")
    parser.add_argument("--config", default=DEFAULT_PRESET, metavar="NAME", help="named preset")
    for key, default in DEFAULTS.items():
        kind = _key_type(key).__name__
        if key == "resume":  # `--resume` alone means the newest checkpoint of this run
            parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="PATH",
                                help="continue a run: 'latest' (default) or a checkpoint / run directory")
            continue
        parser.add_argument(f"--{key}", default=None, metavar=kind.upper(), help=f"default {default!r}")
    return parser


def parse_args(argv: Sequence[str] | None = None, prog: str = "train.py") -> Config:
    """The config for a command line; errors print one line naming the key and exit with status 2."""
    parser = _build_parser(prog)
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k != "config" and v is not None}
    try:
        return load_config(args.config, overrides)
    except ConfigError as e:
        parser.error(str(e))
        raise  # unreachable: error() exits


def config_from_json(path: str | Path) -> Config:
    """A config saved by `Config.to_json` (a run's config.json or a checkpoint's)."""
    data = json.loads(Path(path).read_text())
    preset = data.pop("preset", DEFAULT_PRESET)
    unknown = sorted(set(data) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"{path}: unknown config keys {', '.join(unknown)}")
    return Config({**DEFAULTS, **data}, preset)


def format_config(cfg: Config, keys: Iterable[str] | None = None) -> str:
    """Aligned `key: value` lines for the log."""
    items = cfg.to_dict()
    names = list(keys) if keys is not None else list(items)
    width = max(len(k) for k in names)
    return "\n".join(f"  {k:<{width}} : {items[k]!r}" for k in names)


if __name__ == "__main__":
    print(parse_args(sys.argv[1:], prog="config.py").to_json())
