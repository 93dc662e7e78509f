"""Where processes start: one for a one-GPU or CPU run, or one data-parallel worker per GPU.

The notebook's kernel stays the parent: it spawns one worker per rank (each runs `train.run`
inside the process group), shows rank 0's progress bar and log lines and every worker's stderr,
forwards an interrupt to the workers, and raises a worker's exception with its traceback if one
fails (the others are terminated, so nothing hangs). Only rank 0 writes files; when the workers
are done the parent loads the run's last checkpoint into the notebook's `model`, on the
notebook's device, so `model` and `result` look as they do after a one-process run. Under
torchrun (one or more machines) the processes exist already: each runs the notebook's cells
(`nblib.job`), joins torchrun's process group in the setup cell (`join_torchrun`) and trains its
share; rank 0 then goes on alone. The training loop itself never spawns.
"""
from __future__ import annotations

import dataclasses
import datetime
import logging
import logging.handlers
import os
import signal
import socket
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nblib.data import cache
from nblib.data.cache import Corpus
from nblib.monitoring import plots, progress
from nblib.setup import hardware, lock
from nblib.setup.config import RunConfig
from nblib.setup.hardware import Device
from nblib.training import checkpoint, collectives, loop, state, stopping


def fit(cfg: RunConfig, device: Device, model: torch.nn.Module, corpus: Corpus) -> loop.RunResult:
    """Train `model` as `cfg` says: in this process, or in `device.world_size` data-parallel
    workers (each runs `loop.run`); returns how the run ended either way.

    Raises:
        lock.RunDirectoryBusy: another process is running in `output_dir`.
        torch.multiprocessing.ProcessRaisedException: a worker failed (its traceback included).
    """
    if under_torchrun():
        return _torchrun_share(cfg, device, model, corpus)
    lock.hold(cfg.output_dir)  # the notebook took it in the setup cell; workers run under it
    if device.world_size == 1:
        return loop.run(cfg, device, model, corpus)
    return spawn(cfg, device, model, corpus)


def spawn(cfg: RunConfig, device: Device, model: torch.nn.Module, corpus: Corpus) -> loop.RunResult:
    """Train in `device.world_size` worker processes; returns rank 0's RunResult, rebuilt here
    with the trained weights in `model`, on `device.device` (never moved anywhere else: the
    workers get a copy)."""
    # The weights go through a file, not the process arguments: those would put every tensor in
    # /dev/shm, which Docker sizes at 64 MB (the guide model's embedding alone is 49 MB).
    with tempfile.TemporaryDirectory(prefix="nblib-workers-") as scratch:
        weights = Path(scratch) / "model.pt"
        torch.save(model, weights)  # a copy wherever the model is; the workers load it on the CPU
        rank0, signal_name = _supervise(cfg, device, weights, corpus.cache_dir, Path(scratch))
    final = state.TrainState.of_checkpoint(model, checkpoint.load(rank0["saved"]))
    model.to(device.device)  # where the notebook's next cells expect it
    return loop.RunResult(final, loop.StopReason(rank0["stop_reason"]), cfg.output_dir,
                          rank0["elapsed_seconds"], signal_name or rank0["signal_name"],
                          rank0["total_steps"], rank0["first_step"], rank0["first_tokens"])


def _supervise(cfg, device: Device, weights: Path, cache_dir: Path, scratch: Path) -> tuple[dict, str | None]:
    """Start the workers, relay rank 0's progress and logs and every worker's stderr, forward an
    interrupt; returns rank 0's result (a dict) and the signal that interrupted this process, if any."""
    messages = mp.get_context("spawn").SimpleQueue()
    stderr = StderrRelay([scratch / f"rank{rank}.stderr" for rank in range(device.world_size)])
    context = mp.start_processes(
        _worker, args=(device.world_size, _free_port(), cfg, device, weights, cache_dir, messages, stderr.paths),
        nprocs=device.world_size, join=False, start_method="spawn")
    interrupt, forwarded, rank0, live = stopping.InterruptFlag(), False, None, plots.LiveCurves()
    with interrupt.installed(), progress.bar(total=None, initial=0) as bar:
        try:
            done = False
            while not done:
                done = context.join(timeout=0.2)  # raises when a worker failed, killing the rest
                while not messages.empty():
                    rank0 = _handle(messages.get(), bar, live) or rank0
                stderr.relay()
                if interrupt and not forwarded:  # SIGTERM: a worker may get the SIGINT as well
                    for process in context.processes:
                        os.kill(process.pid, signal.SIGTERM)
                    forwarded = True
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
            stderr.relay(final=True)  # a failed worker's last lines before its traceback
    if rank0 is None:
        raise RuntimeError("the training workers ended without a result")
    return rank0, interrupt.signal_name


def _handle(message: tuple, bar, live: plots.LiveCurves) -> dict | None:
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
    elif kind == "curves":
        live.update(payload)
    elif kind == "result":
        return payload
    return None


def _worker(rank: int, world_size: int, port: int, cfg, device: Device, weights: Path, cache_dir: Path,
            messages, stderr_paths: list[Path]) -> None:
    _stderr_to(stderr_paths[rank])
    _log_to_parent(messages, rank)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if device.is_cuda:
        gpu = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(gpu)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    # Rank 0 alone saves, evaluates samples and writes: the others may wait that long at a collective.
    dist.init_process_group(collectives.backend(device), rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(minutes=30))
    try:
        device = dataclasses.replace(device, rank=rank, device=gpu if device.is_cuda else torch.device("cpu"))
        model = torch.load(weights, map_location="cpu", weights_only=False)  # the parent's, a moment ago
        state.seed_everything(cfg.train.seed, rank)  # dropout masks of their own on each rank
        result = loop.run(cfg, device, model, cache.open_cache(cache_dir, cfg))  # the parent's tokens
        if rank == 0:
            messages.put(("result", {
                "stop_reason": result.stop_reason.value, "elapsed_seconds": result.elapsed_seconds,
                "signal_name": result.signal_name, "saved": str(result.saved),
                "total_steps": result.total_steps, "first_step": result.first_step,
                "first_tokens": result.first_tokens}))
    finally:
        dist.destroy_process_group()


def _stderr_to(path: Path) -> None:
    """This process's file descriptor 2 into `path`: Python's warnings and tracebacks, and what
    C libraries write (NCCL's WARN lines, a crash), which the parent relays to the notebook (a
    kernel shows its own stderr, not its children's)."""
    handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(handle, 2)
    os.close(handle)


class StderrRelay:
    """Copies the lines the workers write to their stderr files into this process's stderr
    (in a notebook, the train cell's output), each marked with its rank."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths
        self.read = [0] * len(paths)  # bytes of each file relayed so far

    def relay(self, final: bool = False) -> None:
        """Every complete line written since the last call (with `final`, an unfinished one too)."""
        for rank, path in enumerate(self.paths):
            if not path.is_file():
                continue
            with path.open("rb") as file:
                file.seek(self.read[rank])
                text = file.read()
            complete = text if final else text[: text.rfind(b"\n") + 1]
            self.read[rank] += len(complete)
            for line in complete.decode(errors="replace").splitlines():
                print(f"[rank {rank}] {line}", file=sys.stderr, flush=True)


def _log_to_parent(messages, rank: int) -> None:
    """Rank 0's log lines and progress bar go to the notebook through the parent (the others'
    errors only)."""
    progress.send_to(messages)
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



def under_torchrun() -> bool:
    """True in a process that torchrun started (it sets these for every process it starts)."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"))


def join_torchrun(precision: str) -> Device:
    """This process as one of torchrun's: its rank, its GPU (or a share of the CPU's threads), and
    torchrun's process group joined: NCCL when each machine's processes have a GPU each (the local
    count decides, not the world's), gloo otherwise. Ranks other than 0 log errors only: rank 0
    speaks for the run. For several machines `output_dir` must be on a disk they share, as
    checkpoints are read by all."""
    rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    device = hardware.detect(precision, 1)
    if device.is_cuda:
        torch.cuda.set_device(local_rank)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world_size))
    device = dataclasses.replace(device, world_size=world_size, rank=rank,
                                 device=torch.device("cuda", local_rank) if device.is_cuda else device.device)
    if rank:
        logging.getLogger().setLevel(logging.ERROR)
    local = dataclasses.replace(device, world_size=local_world_size)
    dist.init_process_group(collectives.backend(local), timeout=datetime.timedelta(minutes=30))
    global _after_training
    _after_training = dist.new_group(backend="gloo", timeout=AFTER_TRAINING_TIMEOUT)
    return device


AFTER_TRAINING_TIMEOUT = datetime.timedelta(hours=24)  # how long the other ranks wait for rank 0's later cells
_after_training = None  # the gloo group they wait in (`leave_torchrun`), made with the process group


def leave_torchrun(trained: bool) -> None:
    """The end of this process's part in a torchrun job. After training (`trained`), every rank
    waits here until rank 0 has run the notebook's later cells too: torchrun stops a machine whose
    processes have all ended, and with it, possibly, the rendezvous that rank 0's machine still
    needs. Then the process group is left. A rank that did not train (a refusal, a dry run) leaves
    at once; where another rank did train, torchrun ends them all when this one exits."""
    if not dist.is_initialized():
        return
    try:
        if trained:
            dist.barrier(group=_after_training)
    finally:
        dist.destroy_process_group()


def prepare(cfg: RunConfig) -> Corpus:
    """The Data cell's corpus; under torchrun tokenized once, in turn (`_prepared_in_turn`)."""
    if under_torchrun() and dist.is_initialized():
        return _prepared_in_turn(cfg, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]))
    return cache.prepare(cfg)


def _torchrun_share(cfg: RunConfig, device: Device, model: torch.nn.Module, corpus: Corpus) -> loop.RunResult:
    """This process's share of a run under torchrun. Every rank starts from rank 0's weights (the
    state broadcasts them) with dropout masks of its own; afterwards rank 0 goes on alone through
    the notebook's later cells while the others wait (`leave_torchrun`)."""
    state.seed_everything(cfg.train.seed, device.rank)
    return loop.run(cfg, device, model, corpus)


def _prepared_in_turn(cfg: RunConfig, rank: int, local_rank: int) -> Corpus:
    """The data, tokenized once: by global rank 0 first, then by each machine's local rank 0 (a
    cache hit on a shared disk), then by the rest from their machine's cache. No two processes
    write one cache at a time."""
    corpus = None
    for turn in (rank == 0, local_rank == 0, True):
        if turn and corpus is None:
            corpus = cache.prepare(cfg)
        dist.barrier()
    return corpus
