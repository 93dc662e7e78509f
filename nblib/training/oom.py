"""Out-of-memory recovery: the one module that knows what an OOM looks like and how to back off.

A CUDA OOM mid-run is answered by halving the micro-batch and doubling gradient accumulation, so
this process's blocks per step (and with them the global batch and the learning-rate schedule)
stay exactly as configured, then
retrying the same optimizer step from its start.
"""
from __future__ import annotations

import gc
import logging
import math
from collections.abc import Callable
from typing import TypeVar

import torch

from nblib.training.state import TrainState

log = logging.getLogger(__name__)
T = TypeVar("T")


class OutOfMemoryAtMicroBatchOne(RuntimeError):
    """Even one block per forward pass does not fit: the model or the context must shrink."""


def is_out_of_memory(error: BaseException) -> bool:
    """torch.OutOfMemoryError (alias torch.cuda.OutOfMemoryError), or an older-style RuntimeError."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error))


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def back_off(state: TrainState, blocks: int) -> bool:
    """Double accumulation and shrink the micro-batch to match; False when it is already 1."""
    if state.batch_size <= 1:
        return False
    state.gradient_accumulation_steps = min(blocks, state.gradient_accumulation_steps * 2)
    state.batch_size = math.ceil(blocks / state.gradient_accumulation_steps)
    return True


def retry_on_oom(state: TrainState, blocks: int, attempt: Callable[[], T],
                 reset: Callable[[], None], agree: Callable[[bool], bool] = bool) -> T:
    """Run `attempt()`; after an OOM, `reset()` (drop the partial gradients), free memory, back
    off and try again with the smaller micro-batch over the same `blocks`. `agree(out_of_memory)` is True when any
    data-parallel rank ran out of memory: then all of them back off together.

    Raises:
        OutOfMemoryAtMicroBatchOne: the OOM happened at a micro-batch of 1.
    """
    while True:
        out_of_memory = False
        try:
            result = attempt()
        except RuntimeError as error:  # torch.OutOfMemoryError is a RuntimeError
            if not is_out_of_memory(error):
                raise
            out_of_memory = True
        if not agree(out_of_memory):
            return result
        # Out of the except block: the traceback, and the activations it kept alive, are gone.
        reset()
        free_memory()
        before = state.batch_size
        if not back_off(state, blocks):
            raise OutOfMemoryAtMicroBatchOne(
                "out of memory with a micro-batch of 1 block: reduce max_length, n_embd or n_layer")
        event = {"step": state.step + 1, "event": "out of memory", "batch_size": state.batch_size,
                 "gradient_accumulation_steps": state.gradient_accumulation_steps}
        state.events.append(event)
        log.warning("out of memory at micro-batch %d: retrying step %d with micro-batch %d x %d "
                    "accumulation (%d blocks per step unchanged)", before, state.step + 1,
                    state.batch_size, state.gradient_accumulation_steps, blocks)


def evaluate_with_backoff(evaluate: Callable[[int], float], batch_size: int) -> float:
    """Evaluation's own recovery: a smaller eval batch on OOM, never a change to training's."""
    while True:
        try:
            return evaluate(batch_size)
        except RuntimeError as error:
            if not is_out_of_memory(error) or batch_size == 1:
                raise
        free_memory()
        batch_size //= 2
        log.warning("out of memory while evaluating: retrying with eval batch %d", batch_size)
