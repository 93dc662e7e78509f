"""What data-parallel ranks agree on: DistributedDataParallel, collectives, the in-sync check.

NCCL on GPUs, gloo on CPU. The collectives are no-ops outside a worker process, so the training
loop calls them unconditionally; `launch` starts the workers.
"""
from __future__ import annotations

import inspect

import torch
import torch.distributed as dist

from .config import TrainConfig
from .hardware import Device

def in_worker() -> bool:
    """True inside a worker process, once its process group is up."""
    return dist.is_available() and dist.is_initialized()


def wrap(model: torch.nn.Module, device: Device) -> torch.nn.parallel.DistributedDataParallel:
    """DDP around `model`. Its buffers are constants (attention masks): nothing to re-broadcast
    before each forward (the argument's name changed in torch 2.13)."""
    parameters = inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
    no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in parameters
                      else {"broadcast_buffers": False})
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.device.index] if device.is_cuda else None, **no_buffer_sync)


def agree(*flags: bool, device: Device) -> tuple[bool, ...]:
    """Each flag True on every rank when it is True on any: how the ranks agree to stop."""
    if not in_worker():
        return tuple(bool(f) for f in flags)
    values = torch.tensor([float(f) for f in flags], device=device.device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return tuple(bool(v) for v in values.tolist())


def any_rank(flag: bool, device: Device) -> bool:
    """True on every rank when `flag` is True on any: how the ranks agree to back off."""
    return agree(flag, device=device)[0]


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over the ranks (itself outside a worker)."""
    if not in_worker():
        return value
    value = value.clone()
    dist.all_reduce(value)
    return value / dist.get_world_size()


def average_gradients(model: torch.nn.Module) -> None:
    """Average the gradients accumulated under DDP's `no_sync` over the ranks, in place (the
    exchange DDP's hooks would do, but only once every rank is past its micro-steps, so an OOM
    backed off on one rank never leaves another waiting in a collective)."""
    for parameter in model.parameters():
        if parameter.grad is not None:
            dist.all_reduce(parameter.grad)
            parameter.grad /= dist.get_world_size()


def check_in_sync(model: torch.nn.Module, step: int, device: Device) -> None:
    """Raise when this rank's weights differ from rank 0's: DDP keeps them bitwise equal, so a
    difference is a bug worth stopping for (checked at every checkpoint)."""
    if not in_worker():
        return
    mine = torch.stack([p.detach().double().sum() for p in model.parameters()])
    reference = mine.clone()
    dist.broadcast(reference, src=0)
    differs = [name for (name, _), a, b in zip(model.named_parameters(), mine, reference) if a != b]
    if differs:
        raise RuntimeError(f"rank {dist.get_rank()}'s weights differ from rank 0's at step {step}: "
                           f"{', '.join(differs[:5])}")


def describe(device: Device, train: TrainConfig) -> str:
    """The global batch, which grows with the number of processes."""
    batch_size, accumulation = train.batch_size, train.gradient_accumulation_steps
    blocks = batch_size * accumulation * device.world_size
    where = (f"data-parallel over {device.world_size} {'GPUs (NCCL)' if device.is_cuda else 'CPU processes (gloo)'}"
             if device.world_size > 1 else "one process")
    return (f"{where}: global batch {batch_size} x {accumulation} x {device.world_size} = {blocks} "
            f"blocks = {blocks * train.max_length:,} tokens per optimizer step")
