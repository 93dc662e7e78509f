"""Data-parallel training over several processes: DistributedDataParallel, NCCL on GPUs, gloo on CPU.

`train.run` calls `launch` when the Device asks for more than one process. The notebook's kernel
stays the parent: it spawns one worker per rank (each runs `train.run` again, inside the process
group), shows rank 0's progress bar and log lines, forwards an interrupt to the workers, and
raises a worker's exception with its traceback if one fails (the others are terminated, so
nothing hangs). Only rank 0 writes files; when the workers are done the parent loads the run's
last checkpoint, so the notebook's `model` and `result` look as they do after a one-process run.
"""
from __future__ import annotations

import dataclasses
import datetime
import gc
import inspect
import logging
import logging.handlers
import os
import signal
import socket
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from . import stopping
from .config import TrainConfig
from .hardware import Device

log = logging.getLogger(__name__)


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


def launch(cfg, device: Device, model: torch.nn.Module):
    """Train in `device.world_size` worker processes; returns rank 0's RunResult, rebuilt here.

    Raises:
        torch.multiprocessing.ProcessRaisedException: a worker failed (its traceback included).
    """
    from . import checkpoint, step, train  # train imports this module

    # The weights go through a file, not the process arguments: those would put every tensor in
    # /dev/shm, which Docker sizes at 64 MB (the guide model's embedding alone is 49 MB).
    handle, name = tempfile.mkstemp(prefix="nblib-workers-", suffix=".pt")
    os.close(handle)
    weights = Path(name)
    try:
        torch.save(model.cpu(), weights)
        outcome, signal_name = _supervise(cfg, device, weights)
    finally:
        weights.unlink(missing_ok=True)
    state = step.new_state(cfg, dataclasses.replace(device, world_size=1), model, outcome["total_steps"])
    state.load_state_dict(checkpoint.load(outcome["saved"]))
    return train.RunResult(state, train.StopReason(outcome["stop_reason"]), cfg.output_dir,
                           outcome["elapsed_seconds"], signal_name or outcome["signal_name"],
                           outcome["total_steps"])


def _supervise(cfg, device: Device, weights: Path) -> tuple[dict, str | None]:
    """Start the workers, relay rank 0's progress and logs, forward an interrupt; returns rank
    0's outcome and the signal that interrupted this process, if any."""
    from . import train

    messages = mp.get_context("spawn").SimpleQueue()
    context = mp.start_processes(
        _worker, args=(device.world_size, _free_port(), cfg, device, weights, messages),
        nprocs=device.world_size, join=False, start_method="spawn")
    interrupt, forwarded, outcome = stopping.InterruptFlag(), False, None
    with interrupt.installed(), train.progress_bar(total=None, initial=0) as bar:
        try:
            done = False
            while not done:
                done = context.join(timeout=0.2)  # raises when a worker failed, killing the rest
                while not messages.empty():
                    outcome = _handle(messages.get(), bar) or outcome
                if interrupt and not forwarded:  # SIGTERM: a worker may get the SIGINT as well
                    for process in context.processes:
                        os.kill(process.pid, signal.SIGTERM)
                    forwarded = True
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
    if outcome is None:
        raise RuntimeError("the training workers ended without a result")
    return outcome, interrupt.signal_name


def _handle(message: tuple, bar) -> dict | None:
    kind, payload = message
    if kind == "log":
        logging.getLogger(payload.name).handle(payload)
    elif kind == "start":  # the run's length, and the step a resume starts from
        bar.reset(total=payload["total"])
        bar.initial = bar.n = bar.last_print_n = payload["initial"]
        bar.refresh()
    elif kind == "progress":
        bar.total = payload["total"]
        bar.set_postfix(payload["postfix"], refresh=False)
        bar.update(payload["step"] - bar.n)
    elif kind == "result":
        return payload
    return None


class ProgressToParent:
    """Rank 0's progress bar: the parent draws it (a widget in Jupyter, lines under papermill)."""

    def __init__(self, messages, total: int, initial: int):
        self.messages, self.total, self.n, self.postfix = messages, total, initial, {}

    def __enter__(self) -> "ProgressToParent":
        self.messages.put(("start", {"total": self.total, "initial": self.n}))
        return self

    def __exit__(self, *exc) -> None:
        pass

    def set_postfix(self, postfix: dict, refresh: bool = False) -> None:
        self.postfix = postfix

    def update(self, n: int = 1) -> None:
        self.n += n
        self.messages.put(("progress", {"step": self.n, "total": self.total, "postfix": self.postfix}))


def _worker(rank: int, world_size: int, port: int, cfg, device: Device, weights: Path, messages) -> None:
    from . import data, train

    _log_to_parent(messages, rank)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if device.is_cuda:
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    # Rank 0 alone saves, evaluates samples and writes: the others may wait that long at a collective.
    dist.init_process_group("nccl" if device.is_cuda else "gloo", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(minutes=30))
    try:
        device = dataclasses.replace(device, rank=rank, device=torch.device("cuda", rank) if device.is_cuda
                                     else device.device)
        model = torch.load(weights, weights_only=False)  # the parent's model, written a moment ago
        result = train.run(cfg, device, model, data.prepare(cfg), messages=messages if rank == 0 else None)
        if rank == 0:
            messages.put(("result", {
                "stop_reason": result.stop_reason.value, "elapsed_seconds": result.elapsed_seconds,
                "signal_name": result.signal_name, "saved": str(result.saved),
                "total_steps": result.total_steps}))
        del result  # DDP's reducer must go before its process group (otherwise exit hangs)
        gc.collect()
    finally:
        dist.destroy_process_group()


def _log_to_parent(messages, rank: int) -> None:
    """Rank 0's log lines go to the notebook through the parent (the others' errors only)."""
    root = logging.getLogger()
    root.handlers[:] = [_QueueHandler(messages)]
    root.setLevel(logging.INFO if rank == 0 else logging.ERROR)


class _QueueHandler(logging.handlers.QueueHandler):
    def enqueue(self, record: logging.LogRecord) -> None:
        self.queue.put(("log", record))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

