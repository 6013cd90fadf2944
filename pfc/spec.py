"""What a backend needs to know about its head: one frozen record built by the facade."""

from __future__ import annotations

from dataclasses import dataclass

from losses import CombinedMarginLoss

OPTIMIZERS = {"sgd": ("momentum",), "adamw": ("exp_avg", "exp_avg_sq")}  # optimizer -> its per-row state arrays
NORM_EPS = 1e-12    # as paddle/torch normalize
EXP_FLOOR = -57.0   # exp(logit - max) floor: e^-57 = 1.8e-25 keeps every product above float32's denormals


@dataclass(frozen=True)
class HeadSpec:
    margin: CombinedMarginLoss
    embedding_size: int
    num_classes: int
    class_start: int
    num_local: int
    sample_rate: float
    rank: int
    world_size: int
    optimizer: str
    momentum: float
    weight_decay: float
    betas: tuple[float, float]
    eps: float
    seed: int

    @property
    def state_names(self) -> tuple[str, ...]:
        return OPTIMIZERS[self.optimizer]
