"""The language-modelling loss: token blocks to inputs and targets, and the cross-entropy over them."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .hardware import Device


def to_batch(blocks: np.ndarray, device: Device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T+1) token blocks -> inputs and targets, each (B, T) int64 on the device."""
    tokens = torch.from_numpy(blocks.astype(np.int64))
    if device.is_cuda:
        tokens = tokens.pin_memory().to(device.device, non_blocking=True)
    return tokens[:, :-1], tokens[:, 1:]


def loss_of(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, device: Device,
            reduction: str = "mean") -> torch.Tensor:
    with device.autocast():
        logits = model(input_ids=inputs, use_cache=False).logits  # (B, T, V); no KV cache in training
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction=reduction)
