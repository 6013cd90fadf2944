"""AMP (fp16) dynamic loss scaling that decides for the backbone and the Partial FC head together.

paddle.amp.GradScaler looks at the backbone's gradients only, and tells whether it skipped a step only through private
attributes. This keeps the scale itself: one finiteness test over every backbone gradient and the head's pending
gradient, on the device, agreed by all ranks (the head's shards differ) and read once per optimizer step (GradScaler
reads its found_inf once per step as well); then both step or neither does. GradScaler's policy and defaults as
train.py used them: halve on inf/NaN, double after `incr_every` finite steps in a row. GPU only (AMP does nothing on
CPU); its logic is device-independent and tested on CPU in fp32.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import paddle
import paddle.distributed as dist


class DynamicLossScale:
    def __init__(self, init_scale: float = 2.0 ** 16, incr_every: int = 100, factor: float = 2.0) -> None:
        self.scale, self.incr_every, self.factor = float(init_scale), int(incr_every), float(factor)
        self.incr_count = 0  # finite steps since the last change of scale

    def scale_loss(self, loss: paddle.Tensor) -> paddle.Tensor:
        return loss * self.scale

    def step(self, optimizer: paddle.optimizer.Optimizer, parameters: Iterable[paddle.Tensor], pfc: Any,
             lr: float) -> bool:
        """Unscale and apply both optimizers if every gradient is finite, else drop the head's gradient and halve the
        scale. The caller clears the backbone's gradients either way. Returns whether the step was applied."""
        grads = [p.grad for p in parameters if p.grad is not None]
        finite = paddle.stack([paddle.isfinite(g).all() for g in grads] + [pfc.grads_finite()]).all()
        if dist.is_initialized() and dist.get_world_size() > 1:
            finite = finite.astype("int32")
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if bool(finite):  # the step's one host read
            with paddle.no_grad():
                for g in grads:
                    g.scale_(1.0 / self.scale)
            optimizer.step()
            pfc.step(lr, loss_scale=self.scale)
            self.incr_count += 1
            if self.incr_count == self.incr_every:
                self.scale, self.incr_count = self.scale * self.factor, 0
            return True
        pfc.zero_grad()
        self.scale, self.incr_count = self.scale / self.factor, 0
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "incr_count": self.incr_count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Also reads the state GradScaler saved in older checkpoints (scale as a 1-element array)."""
        self.scale = float(np.asarray(state["scale"], np.float64).reshape(-1)[0])
        self.incr_count = int(state.get("incr_count", 0))
