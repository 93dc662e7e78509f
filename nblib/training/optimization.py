"""The arithmetic of training: the optimizer and its schedule, and one optimizer step."""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from nblib.setup.config import RunConfig
from nblib.setup.hardware import Device
from nblib.training import collectives, oom
from nblib.training.loss import chunkable_head, compile_for_training, counted_targets, loss_of, to_batch
from nblib.training.schedule import Schedule
from nblib.training.state import TrainState


@dataclass(frozen=True)
class StepStats:
    loss: float  # mean loss over the step's blocks
    grad_norm: float  # before clipping
    applied: bool  # False: skipped, the loss or the gradients were not finite

    @property
    def bad_loss(self) -> bool:
        """A non-finite loss. Non-finite gradients with a finite loss are an fp16 overflow that
        the GradScaler handles: skipped, but not counted towards the bad-loss streak."""
        return not math.isfinite(self.loss)


def build_optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not biases, norms); the fused kernel, on CUDA and
    on CPU alike (7x faster than the default per-tensor loop for the guide's model on a CPU)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.train.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.train.learning_rate, betas=(0.9, 0.95), fused=True)


def new_state(cfg: RunConfig, device: Device, model: torch.nn.Module, steps: int) -> TrainState:
    """Model on the device (rank 0's weights on every rank of a data-parallel run), AdamW, the
    warm-up/cosine schedule over `steps`, a GradScaler for fp16, and the compiled forward when `torch_compile`
    is on."""
    model.to(device.device)
    collectives.broadcast_parameters(model)
    optimizer = build_optimizer(model, cfg)
    schedule = Schedule(cfg.train.learning_rate, cfg.train.warmup_steps, steps)
    schedule.apply(optimizer, 0)
    batch_size, accumulation = collectives.share(cfg.train.global_batch, cfg.train.batch_size, device.world_size)
    return TrainState(
        model=model, optimizer=optimizer,
        schedule=schedule,
        scaler=torch.amp.GradScaler(device.device.type) if device.uses_grad_scaler else None,
        batch_size=batch_size, gradient_accumulation_steps=accumulation,
        global_batch=cfg.train.global_batch, world_size=device.world_size, rank=device.rank,
        compiled=compiled_forward(model, device) if cfg.train.torch_compile else None)


def compiled_forward(model: torch.nn.Module, device: Device) -> torch.nn.Module:
    """What training calls under torch.compile: a plain GPT-2's body (the chunked loss stays
    outside it, and loss_of compiles its pieces), or any other model whole. The model itself is
    left uncompiled, so evaluation (no_grad) and sampling (a KV cache, no autocast) never enter
    the compiled graphs: each would recompile them, and past torch's recompile limit (8) torch
    silently runs eager. Refused where it is known to break: Triton needs compute capability 7.0
    or more (Kaggle's P100 is 6.0). Checkpoints save `model`, so no `_orig_mod.` prefix reaches
    them."""
    if device.is_cuda and device.compute_capability < (7, 0):
        raise ValueError(f"torch_compile=True: torch.compile needs compute capability 7.0 or more, "
                         f"this GPU has {device.compute_capability}; set torch_compile=False")
    head = chunkable_head(model)
    return compile_for_training(model if head is None else head.transformer)


def accumulate_gradients(state: TrainState, blocks: np.ndarray, device: Device,
                         targets_per_rank: float | None = None) -> torch.Tensor:
    """Forward and backward over `blocks` in `state.gradient_accumulation_steps` micro-batches;
    returns the mean loss per target token as a device tensor (no host sync per micro-step). Each
    micro-batch weighs by its targets that carry loss (conversations' answers differ in length):
    the divisor is `targets_per_rank`, the whole step's count over the ranks (default: this
    process's own), so that the ranks' averaged gradients are the global per-token mean. No rank
    waits on another here (the gradients are exchanged after), so an OOM can be agreed on."""
    state.model.train()
    loss_sum = torch.zeros((), device=device.device)
    targets_in_step = max(targets_per_rank or counted_targets(blocks), 1)
    for micro in np.array_split(blocks, state.gradient_accumulation_steps):
        inputs, targets = to_batch(micro, device)
        loss = loss_of(state.model, inputs, targets, device, reduction="sum", compiled=state.compiled)
        _backward(state, loss / targets_in_step)
        loss_sum += loss.detach() / targets_in_step
    return loss_sum


def _backward(state: TrainState, loss: torch.Tensor) -> None:
    (state.scaler.scale(loss) if state.scaler else loss).backward()  # fp16 scales the loss first


def optimizer_step(state: TrainState, blocks: np.ndarray, device: Device, max_grad_norm: float,
                   targets_per_rank: float | None = None) -> StepStats:
    """One optimizer step over `blocks` (this process's share of the global batch), with OOM recovery.

    An OOM halves the micro-batch and retries the same blocks. A non-finite loss or gradient
    norm skips the update (the GradScaler does so itself for fp16 overflow).
    """
    optimizer = state.optimizer
    reset = partial(optimizer.zero_grad, set_to_none=True)
    loss_sum = oom.retry_on_oom(state, len(blocks),
                                lambda: accumulate_gradients(state, blocks, device, targets_per_rank),
                                reset, agree=lambda oom: collectives.any_rank(oom, device))
    # After the ranks agreed on OOM, so no rank waits on one that backs off: a few flat all-reduces.
    collectives.average_gradients(state.model)
    loss_sum = collectives.mean_over_ranks(loss_sum)  # every rank takes the same skip decision
    if state.scaler:
        state.scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), max_grad_norm)
    # Host synchronisations per optimizer step: this read of the loss and the norm; with fp16 the
    # GradScaler's check for inf in scaler.step; in a data-parallel worker also the OOM agreement
    # (oom.retry_on_oom) and the stop agreement before the step (train.run). So 1 on one process
    # (2 in fp16), 3 in a worker (4 in fp16); test_optimization counts them.
    loss, norm = collectives.to_host(torch.stack([loss_sum, grad_norm.to(loss_sum.dtype)]))
    applied = math.isfinite(loss) and math.isfinite(norm)
    if state.scaler:
        state.scaler.step(optimizer)  # skips the update itself on inf/nan gradients
        state.scaler.update()
    elif applied:
        optimizer.step()
    reset()
    return StepStats(loss, norm, applied)
