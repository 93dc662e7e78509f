"""What data-parallel ranks agree on: the gradient exchange, stops, losses, the in-sync check.

NCCL on GPUs, gloo on CPU. The collectives are no-ops outside a worker process, so the training
loop calls them unconditionally; `launch` starts the workers.

No DistributedDataParallel wrapper: its hooks would all-reduce during the backward pass, while
one rank may be backing off from an OOM that the others never saw. The ranks agree on OOM
first, then exchange every gradient in a few flat buckets (`average_gradients`), as DDP's
reducer would, with no reducer buckets held between steps.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist

from nblib.setup.config import TrainConfig
from nblib.setup.hardware import Device

BUCKET_BYTES = 25 * 2**20  # DDP's default bucket size


def backend(device: Device) -> str:
    """NCCL when every rank has a GPU of its own; gloo on CPUs, and for ranks sharing one GPU
    (NCCL refuses that; the GPU check uses it to test two ranks on a one-GPU machine)."""
    return "nccl" if device.is_cuda and torch.cuda.device_count() >= device.world_size else "gloo"


def in_worker() -> bool:
    """True inside a worker process, once its process group is up."""
    return dist.is_available() and dist.is_initialized()


def to_host(values: torch.Tensor) -> list:
    """A device tensor's values on the host: a synchronisation on a GPU. The loop reads the
    device through here only, so its synchronisations can be counted (see optimization)."""
    return values.tolist()


def agree(*flags: bool, device: Device) -> tuple[bool, ...]:
    """Each flag True on every rank when it is True on any: how the ranks agree to stop."""
    if not in_worker():
        return tuple(bool(f) for f in flags)
    values = torch.tensor([float(f) for f in flags], device=device.device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return tuple(bool(v) for v in to_host(values))


def any_rank(flag: bool, device: Device) -> bool:
    """True on every rank when `flag` is True on any: how the ranks agree to back off."""
    return agree(flag, device=device)[0]


def from_rank_0(value: float, device: Device) -> float:
    """Rank 0's `value` on every rank (itself outside a worker): one decision for all."""
    if not in_worker():
        return value
    shared = torch.tensor([float(value)], dtype=torch.float64, device=device.device)
    dist.broadcast(shared, src=0)
    return to_host(shared)[0]


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


def buckets(tensors: list[torch.Tensor], limit_bytes: int = BUCKET_BYTES) -> list[list[torch.Tensor]]:
    """Consecutive tensors of one dtype and device, grouped up to `limit_bytes` each (a larger
    tensor is a bucket of its own)."""
    groups: list[list[torch.Tensor]] = []
    size = 0
    for tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        fits = groups and size + nbytes <= limit_bytes and (
            groups[-1][0].dtype, groups[-1][0].device) == (tensor.dtype, tensor.device)
        if not fits:
            groups.append([])
            size = 0
        groups[-1].append(tensor)
        size += nbytes
    return groups


def _exchange_flat(tensors: list[torch.Tensor], exchange: Callable[[torch.Tensor], None]) -> None:
    """`exchange` each bucket of `tensors` as one flat tensor, in place: one collective per bucket."""
    for bucket in buckets(tensors):
        flat = torch.cat([t.reshape(-1) for t in bucket])
        exchange(flat)
        for tensor, part in zip(bucket, flat.split([t.numel() for t in bucket])):
            tensor.copy_(part.view_as(tensor))


def average_gradients(model: torch.nn.Module) -> None:
    """Average the accumulated gradients over the ranks, in place, once every rank is past its
    micro-steps (so an OOM backed off on one rank never leaves another waiting in a collective):
    one all-reduce per BUCKET_BYTES of gradients (2 for the guide's 19.3M fp32 parameters, 1 for
    the smoke model), not one per parameter."""
    if not in_worker():
        return

    def mean(flat: torch.Tensor) -> None:
        dist.all_reduce(flat)
        flat /= dist.get_world_size()

    _exchange_flat([p.grad for p in model.parameters() if p.grad is not None], mean)


def broadcast_parameters(model: torch.nn.Module) -> None:
    """Rank 0's weights on every rank, as DDP's constructor makes them: the ranks start equal
    even where building the model drew random numbers differently."""
    if in_worker():
        with torch.no_grad():
            _exchange_flat([p.data for p in model.parameters()], lambda flat: dist.broadcast(flat, src=0))


def check_in_sync(model: torch.nn.Module, step: int, device: Device) -> None:
    """Raise when this rank's weights differ from rank 0's: the averaged gradients keep them
    bitwise equal, so a difference is a bug worth stopping for (checked at every checkpoint)."""
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
