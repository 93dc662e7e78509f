"""Validation: the mean loss per token over fixed blocks, whatever the eval batch, and perplexity."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from nblib import files
from nblib.setup.hardware import Device
from nblib.training import oom
from nblib.training.loss import counted_targets, loss_of, to_batch

HISTORY = "training_history.json"


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


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
        add_to_history(cfg.output_dir, test_loss=loss, test_perplexity=perplexity(loss))
    return loss


def read_history(run_dir) -> list[dict]:
    """The run's `training_history.json` (one record per evaluation); [] before the first."""
    history_file = Path(run_dir) / HISTORY
    return json.loads(history_file.read_text()) if history_file.is_file() else []


def add_to_history(run_dir, **values) -> None:
    """Results measured after training (test loss, HellaSwag), into the history's last record,
    which the summary and the model card read."""
    history = read_history(run_dir)
    if history:
        history[-1].update(values)
        files.write_json(Path(run_dir) / HISTORY, history)
