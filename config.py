"""Every training setting in one place: defaults, named presets, command-line overrides.

(Skeleton: the key names below are the contract between modules; presets and CLI parsing come with train.py.)
"""

DEFAULTS = {
    # model
    "network": "mbf",            # r18 r34 r50 r100 r200 mbf mbf_large
    "width": 1.0,                # channel-width multiplier (1.0 = arcface_torch's architecture)
    "embedding_size": 512,
    "dropout": 0.0,
    "fp16": False,
    # loss / head
    "loss": "arcface",           # arcface | cosface | combined
    "margin_s": 64.0,
    "margin_m1": 1.0,
    "margin_m2": 0.5,
    "margin_m3": 0.0,
    "margin_grad": "straight_through",  # straight_through (arcface_torch) | exact
    "interclass_filtering_threshold": 0.0,
    "sample_rate": 1.0,
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
    # data
    "data": "synthetic",         # a directory with train.rec/train.idx, an image folder, or "synthetic"
    "num_classes": None,         # None: read from the dataset
    "num_workers": 2,
    "seed": 2048,
    "cache_dir": ".cache",       # where the built-in synthetic set is generated on first use
    "synthetic_identities": 1000,
    "synthetic_images_per_id": 20,
    "synthetic_val_pairs": 1000,
    # evaluation / output
    "val_targets": [],           # names of .bin files in the data directory, e.g. ["lfw", "cfp_fp", "agedb_30"]
    "val_every": 2000,
    "log_every": 10,
    "save_every": 0,
    "output": "work_dirs",
}
