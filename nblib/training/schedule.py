"""The learning-rate schedule: a linear warm-up to the peak, then a cosine decay to a tenth of it
(nanoGPT's), over the run's steps. It owns the optimizer's learning rate: the loop sets it after
each step, and a resumed run's new peak or length takes effect through it from the resumed step."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

MIN_LR_RATIO = 0.1  # cosine decays to a tenth of the peak, as nanoGPT does


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the peak learning rate at `step`: linear warm-up, then cosine decay."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class Schedule:
    peak: float  # learning_rate
    warmup_steps: int
    total_steps: int  # the step the decay reaches its floor (the run's length)

    def lr(self, step: int) -> float:
        """The learning rate of the optimizer step after `step` steps."""
        return self.peak * lr_factor(step, self.warmup_steps, self.total_steps)

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Set every parameter group's learning rate for the step after `step` steps."""
        for group in optimizer.param_groups:
            group["lr"] = self.lr(step)

    def state_dict(self) -> dict:
        return asdict(self)
