"""What data-parallel ranks agree on: DistributedDataParallel, collectives, the in-sync check.

NCCL on GPUs, gloo on CPU. The collectives are no-ops outside a worker process, so the training
loop calls them unconditionally; `launch` starts the workers.
"""
from __future__ import annotations

import inspect
import math

import torch
import torch.distributed as dist

from .config import TrainConfig
from .hardware import Device

def backend(device: Device) -> str:
    """NCCL when every rank has a GPU of its own; gloo on CPUs, and for ranks sharing one GPU
    (NCCL refuses that; the GPU check uses it to test two ranks on a one-GPU machine)."""
    return "nccl" if device.is_cuda and torch.cuda.device_count() >= device.world_size else "gloo"


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


def gather(value: object, device: Device) -> list | None:
    """Every rank's `value` in rank order on rank 0, None on the others; `[value]` outside a
    worker. A collective: call it where every rank arrives (a periodic save, a stop)."""
    if not in_worker():
        return [value]
    values = [None] * dist.get_world_size() if device.is_main else None
    dist.gather_object(value, values, dst=0)
    return values


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


def share(global_batch: int, batch_size: int, world_size: int) -> tuple[int, int]:
    """This process's micro-batch and accumulation steps for its share of `global_batch` blocks:
    the global batch stays what the configuration says whatever the number of processes
    (the guide's 8 x 8 = 64 is 8 x 8 on one T4, 8 x 4 on each of two).

    Raises:
        ValueError: the processes cannot share the global batch evenly.
    """
    if global_batch % world_size:
        raise ValueError(f"batch_size x gradient_accumulation_steps = {global_batch} blocks cannot be "
                         f"shared evenly by {world_size} processes: make it a multiple of {world_size}, "
                         "or set devices=1")
    per_rank = global_batch // world_size
    micro_steps = math.ceil(per_rank / batch_size)
    return math.ceil(per_rank / micro_steps), micro_steps


def describe(device: Device, train: TrainConfig) -> str:
    """The global batch, and each process's share of it.

    Raises:
        ValueError: the processes cannot share the global batch evenly.
    """
    blocks, processes = train.global_batch, device.world_size
    batch_size, accumulation = share(blocks, train.batch_size, processes)
    line = (f"global batch {train.batch_size} x {train.gradient_accumulation_steps} = {blocks} blocks "
            f"= {train.tokens_per_step:,} tokens per optimizer step")
    if processes == 1:
        return f"one process: {line}"
    units, unit = ("GPUs (NCCL)", "GPU") if device.is_cuda else ("CPU processes (gloo)", "CPU process")
    return f"data-parallel over {processes} {units}: {line}, each {unit} taking {batch_size} x {accumulation}"
