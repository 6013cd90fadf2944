"""Backbone weights that behave like a trained model's for export and inference tests.

Random initialisation leaves BatchNorm running statistics at (0, 1), so a deep net's outputs grow to 1e20 and
float32 differences between runtimes become meaningless. Setting the statistics from one batch of synthetic
faces (momentum 0) gives embeddings of the size a trained model produces (|x| ~ 1-5).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import paddle

import backbones
from utils.faces import render_face, sample_identity
from utils.image import preprocess_batch


def synthetic_faces(count: int, seed: int = 0) -> np.ndarray:
    """`count` aligned 112x112 RGB faces, each of a new identity."""
    rng = np.random.default_rng(seed)
    return np.stack([render_face(sample_identity(rng), rng)[0] for _ in range(count)])


def calibrated_weights(network: str, path: Path, width: float = 1.0, embedding_size: int = 512,
                       seed: int = 0) -> Path:
    """Save a `network` state dict with random weights and BatchNorm statistics of 16 synthetic faces."""
    paddle.seed(seed)
    model = backbones.get_model(network, num_features=embedding_size, width=width)
    norms = [layer for layer in model.sublayers() if isinstance(layer, paddle.nn.layer.norm._BatchNormBase)]
    for layer in norms:
        layer._momentum = 0.0
    model.train()
    with paddle.no_grad():
        model(paddle.to_tensor(preprocess_batch(synthetic_faces(16, seed + 1000))))
    model.eval()
    paddle.save(model.state_dict(), str(path))
    return path
