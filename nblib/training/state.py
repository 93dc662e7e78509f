"""TrainState: everything a resume needs, and its conversion to and from a checkpoint dict."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from nblib import history
from nblib.model import gpt2
from nblib.training.schedule import Schedule


@dataclass
class TrainState:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer | None  # None: a finished run to read, not to resume (`of_checkpoint`)
    schedule: Schedule | None  # owns the optimizer's learning rate
    scaler: torch.amp.GradScaler | None
    batch_size: int  # micro-batch in use (OOM recovery may lower it)
    gradient_accumulation_steps: int  # raised with it, so this process's blocks per step stay fixed
    global_batch: int  # blocks per optimizer step over all processes
    world_size: int = 1  # data-parallel processes sharing `global_batch`
    rank: int = 0  # this process's place among them
    step: int = 0  # optimizer steps done
    epoch: int = 0  # current pass over the training blocks
    position: int = 0  # blocks of this epoch's shuffled order already consumed
    tokens_seen: int = 0
    best_val_loss: float = math.inf
    train_loss: float = math.nan  # mean training loss since the last evaluation
    val_loss: float = math.nan  # latest validation loss
    history: list[history.Record] = field(default_factory=list)
    step_losses: list[float] = field(default_factory=list)  # one per optimizer step, NaN if skipped
    skipped_steps: int = 0  # steps whose update was skipped (non-finite loss or gradients)
    bad_streak: int = 0  # consecutive steps with a non-finite loss
    planned_steps: int | None = None  # fit_to_budget: the run's length, fitted to its budget (training.planning)
    events: list[dict[str, Any]] = field(default_factory=list)  # OOM back-offs, in order
    compiled: torch.nn.Module | None = None  # what training calls under torch.compile; None: the model

    @property
    def per_rank_batch(self) -> int:
        """Blocks this process handles per optimizer step."""
        return self.global_batch // self.world_size

    def state_dict(self, config: dict[str, Any], rank_rng_states: list[dict] | None = None) -> dict[str, Any]:
        """A checkpoint that `torch.load(path, weights_only=True)` can read: tensors and primitives.
        `rank_rng_states`: every data-parallel rank's RNG state, gathered at a save all ranks
        reach (without it, only this process's is kept)."""
        rank_rng_states = rank_rng_states or [capture_rng()]
        return {
            **gpt2.checkpoint_weights(self.model),
            "optimizer_state_dict": self.optimizer.state_dict(),
            "scheduler_state_dict": self.schedule.state_dict(),
            "scaler_state_dict": self.scaler.state_dict() if self.scaler else None,
            "epoch": self.epoch, "step": self.step, "position": self.position,
            "tokens_seen": self.tokens_seen, "best_val_loss": self.best_val_loss,
            "train_loss": self.train_loss, "val_loss": self.val_loss,
            "batch_size": self.batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "global_batch": self.global_batch, "world_size": self.world_size,
            "rng_state": rank_rng_states[0], "rank_rng_states": rank_rng_states,
            "history": [record.to_dict() for record in self.history],
            "step_losses": list(self.step_losses), "skipped_steps": self.skipped_steps,
            "bad_streak": self.bad_streak, "events": list(self.events), "config": config,
            "planned_steps": self.planned_steps,
        }

    @classmethod
    def of_checkpoint(cls, model: torch.nn.Module, checkpoint: dict[str, Any]) -> TrainState:
        """The weights, counters and history of a checkpoint, without an optimizer: how the
        notebook's process reads what its data-parallel workers left."""
        state = cls(model, None, None, None, batch_size=0, gradient_accumulation_steps=0, global_batch=0)
        gpt2.load_weights(model, checkpoint)
        state._load_progress(checkpoint)
        return state

    def load_state_dict(self, checkpoint: dict[str, Any]) -> None:
        """Restore from a checkpoint dict (tensors may be on any device)."""
        gpt2.load_weights(self.model, checkpoint)
        self.optimizer.load_state_dict(checkpoint["optimizer_state_dict"])
        if self.scaler and checkpoint.get("scaler_state_dict"):
            self.scaler.load_state_dict(checkpoint["scaler_state_dict"])
        self._load_progress(checkpoint)
        self._restore_rng(checkpoint)

    def _load_progress(self, checkpoint: dict[str, Any]) -> None:
        for name in ("epoch", "step", "position", "tokens_seen", "best_val_loss", "train_loss",
                     "val_loss", "batch_size", "gradient_accumulation_steps"):
            setattr(self, name, checkpoint[name])
        self.world_size = checkpoint.get("world_size", 1)
        self.global_batch = global_batch_of(checkpoint)
        self.history = [history.Record.from_dict(record) for record in checkpoint["history"]]
        self.step_losses = list(checkpoint.get("step_losses", []))
        self.skipped_steps = checkpoint.get("skipped_steps", 0)
        self.bad_streak = checkpoint.get("bad_streak", 0)
        self.planned_steps = checkpoint.get("planned_steps")
        self.events = list(checkpoint.get("events", []))

    def _restore_rng(self, checkpoint: dict[str, Any]) -> None:
        """This rank's own RNG state (dropout masks differ between ranks). A rank the checkpoint
        has none for (it was saved by fewer processes, or outside a save all ranks reached) keeps
        the seed it started with."""
        states = checkpoint.get("rank_rng_states") or [checkpoint["rng_state"]]
        if self.rank < len(states):
            restore_rng(states[self.rank])


def global_batch_of(checkpoint: dict[str, Any]) -> int:
    """Blocks per optimizer step over all processes (older, one-process checkpoints lack it)."""
    if "global_batch" in checkpoint:
        return checkpoint["global_batch"]
    return checkpoint["batch_size"] * checkpoint["gradient_accumulation_steps"]


def capture_rng() -> dict[str, Any]:
    """Python, numpy and torch RNG states as lists and tensors (numpy arrays don't load safely)."""
    numpy_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(rng: dict[str, Any]) -> None:
    random.setstate(_as_tuples(rng["python"]))
    name, keys, *rest = rng["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(rng["torch"].cpu())
    if torch.cuda.is_available() and rng["cuda"]:
        torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]][: torch.cuda.device_count()])


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed python, numpy and torch; call before building the model so weights repeat. A
    data-parallel rank above 0 gets a seed of its own, so its dropout masks differ from rank 0's."""
    if rank:
        seed = int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _as_tuples(value):
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value
