"""The whole training step against arcface_torch's, forced-step protocol (docs/training.md, DESIGN.md section 3).

Before every step the same float32 state (backbone weights and BN statistics, momentum buffers, centres and their
momentum) goes into the project's real training pieces (engine.step's builders of the backbone, the Partial FC head
at sample_rate 1 and the optimizer, utils.lr_scheduler, and the TrainStep that train.py steps) and into a float64 run
of the PyTorch reference (tests/torch_train_reference.py). Both take one optimizer step on the same batch; then the
change of every tensor is compared on its own, relative to the size of the reference's change. A tensor that moves on
one side only fails whatever its size. The next step starts from the reference's result rounded to float32, so the
steps stay comparable (free-running float32 trajectories diverge chaotically at s=64 even within PyTorch).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import paddle
import pytest
import torch

from backbones import get_model
from config import load_config
from engine.step import TrainStep, build_backbone, build_head, build_optimizer
from tests.torch_reference import randomize
from tests.torch_train_reference import ReferenceTrainer, get_scaled_model
from utils import checkpoint as ckpt_io
from utils.lr_scheduler import PolynomialLRWarmup

BATCH, CLASSES, EMBEDDING, WIDTH, STEPS = 8, 12, 64, 0.25, 3
LR, WEIGHT_DECAY, TOTAL_STEPS = 0.1, 5e-4, 10  # no warm-up: both schedules give 0.1, 0.09, 0.08 (compared below)
# float32 against float64 (measured on these steps by `python -m tests.test_train_parity`, PyTorch float32 in
# brackets): the median error of a step's weights, momentum buffers or BN statistics is at most 5.8e-4 (1.9e-3); the
# worst tensor 3e-4..1.4e-2 (4e-3..1.4e-2): a few BN biases and PReLU slopes whose gradient is a sum with heavy
# cancellation, or where an activation near 0 takes the other PReLU branch in float32. A missing gradient gives 1
# (and fails the one-sided check first); a systematic error moves a median (lr 1% off: the weights' to 1e-2).
TOLERANCE, MEDIAN_TOLERANCE = 5e-2, 5e-3
_PADDLE_NAMES = {"running_mean": "_mean", "running_var": "_variance"}


@dataclass
class State:
    """Everything one step reads and writes, in arcface_torch's names and layouts (float32 or float64 arrays)."""

    backbone: dict[str, np.ndarray]   # parameters and BN running statistics
    momentum: dict[str, np.ndarray]   # momentum buffers of the trained backbone parameters
    centres: np.ndarray
    centres_momentum: np.ndarray

    def tensors(self) -> dict[str, np.ndarray]:
        return {**self.backbone, **{f"momentum of {k}": v for k, v in self.momentum.items()},
                "centres": self.centres, "momentum of centres": self.centres_momentum}

    def astype(self, dtype: type) -> State:
        cast = {k: v.astype(dtype) for k, v in self.tensors().items()}
        return State({k: cast[k] for k in self.backbone}, {k: cast[f"momentum of {k}"] for k in self.momentum},
                     cast["centres"], cast["momentum of centres"])


def _paddle_name(name: str) -> str:
    prefix, _, leaf = name.rpartition(".")
    return f"{prefix}.{_PADDLE_NAMES.get(leaf, leaf)}"


def _paddle_layout(array: np.ndarray) -> np.ndarray:
    return array.T if array.ndim == 2 else array  # Linear weights are [in, out] in Paddle


class Project:
    """The project's training pieces, stepped by train.py's TrainStep (gradient_acc 1, no AMP)."""

    def __init__(self, network: str) -> None:
        self.cfg = load_config("synthetic", {"network": network, "width": WIDTH, "embedding_size": EMBEDDING,
                                             "lr": LR, "weight_decay": WEIGHT_DECAY, "warmup_epoch": 0,
                                             "num_classes": CLASSES})
        assert self.cfg.sample_rate == 1.0 and self.cfg.gradient_acc == 1 and self.cfg.clip_grad_norm == 5.0
        self.backbone = build_backbone(self.cfg)
        self.pfc = build_head(self.cfg, CLASSES)
        self.scheduler = PolynomialLRWarmup(self.cfg.lr, 0, TOTAL_STEPS)
        self.optimizer = build_optimizer(self.cfg, self.backbone.parameters(), self.scheduler)
        self.trainer = TrainStep(self.backbone, self.pfc, self.optimizer, self.scheduler)
        self.backbone.train()

    def load(self, state: State) -> None:
        self.loaded = state
        self.backbone.set_state_dict({_paddle_name(k): _paddle_layout(v) for k, v in state.backbone.items()})
        velocity = {f"{k}_velocity_0": _paddle_layout(v) for k, v in state.momentum.items()}
        ckpt_io.set_optimizer_state(self.optimizer, self.backbone,
                                    {**velocity, "LR_Scheduler": self.scheduler.state_dict()})
        head = self.pfc.state_dict()
        self.pfc.set_state_dict({**head, "weight": state.centres, "momentum": state.centres_momentum})

    def step(self, images: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
        result = self.trainer(iter([(paddle.to_tensor(images), paddle.to_tensor(labels))]))
        return result.loss, result.lr

    def state(self) -> State:
        """The state after the step; a momentum buffer the optimizer never created (no gradient) is as loaded."""
        values = {k: v.numpy() for k, v in self.backbone.state_dict().items()}
        velocity = ckpt_io.optimizer_state(self.optimizer, self.backbone)
        momentum = {k: _paddle_layout(np.asarray(velocity[f"{k}_velocity_0"])) if f"{k}_velocity_0" in velocity
                    else v for k, v in self.loaded.momentum.items()}
        head = self.pfc.state_dict()
        return State({k: _paddle_layout(values[_paddle_name(k)]) for k in self.loaded.backbone}, momentum,
                     head["weight"].copy(), head["momentum"].copy())


class Reference:
    """The PyTorch reference in float64 (or float32, to see what float32 alone gives), loaded before every step."""

    def __init__(self, network: str, state: State, dtype: type = np.float64) -> None:
        self.dtype = dtype
        self.model = get_scaled_model(network, EMBEDDING, WIDTH).to(torch.from_numpy(np.zeros(0, dtype)).dtype)
        self.trainer = ReferenceTrainer(self.model, torch.from_numpy(state.centres.astype(dtype)), LR,
                                        WEIGHT_DECAY, 0, TOTAL_STEPS)

    def load(self, state: State) -> None:
        wide = state.astype(self.dtype)
        self.model.load_state_dict({k: torch.from_numpy(v) for k, v in wide.backbone.items()}, strict=False)
        with torch.no_grad():
            self.trainer.centres.copy_(torch.from_numpy(wide.centres))
        self.trainer.load_momentum({k: torch.from_numpy(v) for k, v in wide.momentum.items()},
                                   torch.from_numpy(wide.centres_momentum))

    def step(self, images: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
        return self.trainer.step(torch.from_numpy(images), torch.from_numpy(labels))

    def state(self) -> State:
        values = {k: v.detach().numpy().copy() for k, v in self.model.state_dict().items()
                  if not k.endswith("num_batches_tracked")}
        buffers = {k: v.numpy().copy() for k, v in self.trainer.momentum_buffers().items()}
        return State(values, buffers, self.trainer.centres.detach().numpy().copy(),
                     self.trainer.optimizer.state[self.trainer.centres]["momentum_buffer"].numpy().copy())


def initial_state(network: str) -> State:
    """Random weights and BN statistics (tests/torch_reference.randomize), centres N(0, 0.01), zero momentum."""
    model = randomize(get_scaled_model(network, EMBEDDING, WIDTH), seed=7)
    backbone = {k: v.numpy().copy() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    momentum = {k: np.zeros_like(backbone[k]) for k, p in model.named_parameters() if p.requires_grad}
    centres = np.random.default_rng(7).normal(0.0, 0.01, (CLASSES, EMBEDDING)).astype(np.float32)
    return State(backbone, momentum, centres, np.zeros_like(centres))


def update_errors(before: State, project: State, reference: State) -> tuple[dict[str, float], list[str]]:
    """Per tensor: |project change - reference change| / |reference change|; and the tensors moved on one side only."""
    start, ours, ref = before.tensors(), project.tensors(), reference.tensors()
    assert set(ours) == set(ref) == set(start)
    errors, one_sided = {}, []
    for name, value in start.items():
        base = value.astype(np.float64)
        ref_change = ref[name].astype(np.float64) - base
        our_change = ours[name].astype(np.float64) - base
        ref_size, our_size = np.linalg.norm(ref_change), np.linalg.norm(our_change)
        if (ref_size == 0) != (our_size == 0):
            side = "the reference only" if our_size == 0 else "the project only"
            one_sided.append(f"{name} moves in {side} (|change| project {our_size:.3g}, reference {ref_size:.3g})")
        elif ref_size > 0:
            errors[name] = float(np.linalg.norm(our_change - ref_change) / ref_size)
    return errors, one_sided


def group_medians(errors: dict[str, float]) -> dict[str, float]:
    """Median error of the weights, of the momentum buffers and of the BN statistics (a systematic error shows in
    its own group: an lr off by 1% moves every weight by 1% but no momentum buffer)."""
    groups: dict[str, list[float]] = {"weights": [], "momentum": [], "BN statistics": []}
    for name, error in errors.items():
        group = ("momentum" if name.startswith("momentum of ") else
                 "BN statistics" if name.endswith(("running_mean", "running_var")) else "weights")
        groups[group].append(error)
    return {group: float(np.median(values)) for group, values in groups.items() if values}


def forced_steps(network: str, float32_reference: bool = False) -> list[dict]:
    """STEPS forced steps; per step the per-tensor errors, one-sided movers, both losses and both learning rates
    (and the errors of a float32 run of the reference, if asked)."""
    paddle.seed(0)
    state = initial_state(network)
    project, reference = Project(network), Reference(network, state)
    reference32 = Reference(network, state, np.float32) if float32_reference else None
    rng = np.random.default_rng(11)
    results = []
    for _ in range(STEPS):
        images = rng.integers(0, 256, (BATCH, 112, 112, 3), dtype=np.uint8)
        labels = rng.integers(0, CLASSES, BATCH).astype(np.int64)
        project.load(state)
        reference.load(state)
        loss, lr = project.step(images, labels)
        ref_loss, ref_lr = reference.step(images, labels)
        after = reference.state()
        errors, one_sided = update_errors(state, project.state(), after)
        results.append({"errors": errors, "one_sided": one_sided, "loss": (loss, ref_loss), "lr": (lr, ref_lr)})
        if reference32 is not None:
            reference32.load(state)
            reference32.step(images, labels)
            results[-1]["float32 errors"] = update_errors(state, reference32.state(), after)[0]
        state = after.astype(np.float32)
    return results


@pytest.mark.parametrize("network", ["r18", "mbf"])
def test_training_step_matches_arcface_torch(network: str, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # torch's first SGD step imports torch._dynamo, which
    # would otherwise set it for the rest of the session
    results = forced_steps(network)
    for step, result in enumerate(results, start=1):
        assert result["lr"][0] == pytest.approx(result["lr"][1], rel=1e-12), f"step {step}: lr {result['lr']}"
        assert result["loss"][0] == pytest.approx(result["loss"][1], rel=1e-5), f"step {step}: loss {result['loss']}"
        assert not result["one_sided"], f"step {step}: " + "; ".join(result["one_sided"])
        errors = result["errors"]
        worst = sorted(errors.items(), key=lambda item: -item[1])[:5]
        assert worst[0][1] < TOLERANCE, f"step {step}: relative update errors (worst first) {worst}"
        medians = group_medians(errors)
        assert max(medians.values()) < MEDIAN_TOLERANCE, f"step {step}: medians {medians}, worst {worst}"


@pytest.mark.parametrize(("network", "options"), [("r18", {}), ("r18", {"recompute": True}), ("mbf", {}),
                                                  ("mbf_large", {}), ("vit_t", {})])
def test_every_trainable_tensor_gets_a_gradient(network: str, options: dict) -> None:
    """The bug class of features.bias, on every backbone's CPU training path (NumPy PReLU and activation recompute
    included): a tensor that should train but receives no gradient is skipped by the optimizer without a word.
    arcface_torch freezes exactly one tensor, the gamma of an iresnet's `features`."""
    paddle.seed(0)
    model = get_model(network, num_features=32, width=WIDTH, **options)
    model.train()
    out = model(paddle.randn([4, 3, 112, 112]))
    (out * paddle.randn(out.shape)).sum().backward()
    weights = {n: p for n, p in model.named_parameters() if not n.endswith(("._mean", "._variance"))}  # BN statistics
    frozen = {n for n, p in weights.items() if p.stop_gradient}
    assert frozen == ({"features.weight"} if network.startswith("r") else set()), frozen
    silent = [n for n, p in weights.items() if n not in frozen and (p.grad is None or not np.any(p.grad.numpy()))]
    assert not silent, f"trainable but no gradient: {silent}"


def _print_figures() -> None:
    """python -m tests.test_train_parity: the per-step figures quoted in docs/training.md."""
    for network in ("r18", "mbf"):
        for step, result in enumerate(forced_steps(network, float32_reference=True), start=1):
            line = [f"{network} step {step}: lr {result['lr'][0]:.4f} / {result['lr'][1]:.4f}",
                    f"loss {result['loss'][0]:.6f} / {result['loss'][1]:.6f}"]
            for label, errors in (("project", result["errors"]), ("torch float32", result["float32 errors"])):
                worst = max(errors, key=errors.get)
                medians = ", ".join(f"{group} {value:.1e}" for group, value in group_medians(errors).items())
                line.append(f"{label}: medians {medians}; worst {errors[worst]:.1e} ({worst})")
            print("; ".join(line))


if __name__ == "__main__":
    _print_figures()
