"""Validation: the mean loss per token over fixed blocks, whatever the eval batch, and perplexity."""
from __future__ import annotations

import numpy as np
import torch

from nblib import history
from nblib.setup.hardware import Device
from nblib.training import oom
from nblib.training.loss import counted_targets, loss_of, to_batch


@torch.no_grad()
def evaluate(model: torch.nn.Module, blocks: np.ndarray, device: Device, batch_size: int) -> float:
    """Mean loss per target token over `blocks`, whatever the eval batch (`batch_size`, or less
    after an OOM): the same blocks give the same loss up to float rounding."""
    if len(blocks) == 0:
        raise ValueError("no blocks to evaluate: a loss over nothing would read as 0")

    def mean_loss(eval_batch: int) -> float:
        model.eval()
        total, counted = torch.zeros((), dtype=torch.float64, device=device.device), 0
        for start in range(0, len(blocks), eval_batch):
            batch = blocks[start:start + eval_batch]
            inputs, targets = to_batch(batch, device)
            total += loss_of(model, inputs, targets, device, reduction="sum").double()
            counted += counted_targets(batch)
        if counted == 0:
            raise ValueError("no token of these blocks carries loss (conversations whose answers all "
                             "fall outside them): a loss over nothing would read as 0")
        return (total / counted).item()

    return oom.evaluate_with_backoff(mean_loss, batch_size)


def evaluate_test(model: torch.nn.Module, corpus, device: Device, cfg) -> float:
    """The notebook's Evaluate cell: the loss on the test split, added to the run's history."""
    loss = evaluate(model, corpus.blocks("test"), device, cfg.train.batch_size)
    if device.is_main:
        history.add_to_last(cfg.output_dir, test_loss=loss)
    return loss
