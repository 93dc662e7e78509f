"""How a run ended: the stop reason, and the result the notebook prints and acts on."""
from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

from . import checkpoint
from .evaluation import perplexity
from .state import TrainState


class StopReason(str, enum.Enum):
    COMPLETED = "completed"
    TIME_BUDGET = "time budget"
    INTERRUPTED = "interrupted"
    BAD_LOSS = "bad loss"
    OUT_OF_MEMORY = "out of memory at micro-batch 1"


@dataclass
class RunResult:
    state: TrainState
    stop_reason: StopReason
    run_dir: Path
    elapsed_seconds: float
    signal_name: str | None = None  # what interrupted the run, if anything
    total_steps: int = 0  # the run's length, which the learning-rate schedule spans

    @property
    def saved(self) -> Path:
        """The file holding the state training stopped in."""
        if self.stop_reason in (StopReason.COMPLETED, StopReason.TIME_BUDGET):
            return checkpoint.checkpoint_path(self.run_dir, self.state.epoch, self.state.step)
        return self.run_dir / checkpoint.EMERGENCY

    @property
    def history(self) -> list[dict]:
        return self.state.history

    def describe(self) -> str:
        """What happened, and what to do next."""
        s = self.state
        facts = (f"{s.step} steps, {s.tokens_seen:,} tokens in {self.elapsed_seconds:.0f} s, "
                 f"{s.skipped_steps} skipped; best validation loss {s.best_val_loss:.4f} "
                 f"(perplexity {perplexity(s.best_val_loss):.1f}){self._memory()}")
        emergency = self.run_dir / checkpoint.EMERGENCY
        resume = "resume with resume_from_checkpoint='auto'"
        advice = {
            StopReason.COMPLETED: "completed",
            StopReason.TIME_BUDGET: f"stopped at the time budget; {resume}",
            StopReason.INTERRUPTED: f"interrupted by {self.signal_name or 'a signal'}: saved {emergency}; {resume}",
            StopReason.BAD_LOSS: (f"stopped after {s.bad_streak} steps in a row with a non-finite "
                                  f"loss: saved {emergency} from the last good weights; lower "
                                  f"learning_rate, then {resume}"),
            StopReason.OUT_OF_MEMORY: (f"out of memory even with a micro-batch of 1: saved "
                                       f"{emergency}; reduce max_length, n_embd or n_layer"),
        }
        return f"{advice[self.stop_reason]}: {facts}"

    def _memory(self) -> str:
        """The peak memory of the first and the last evaluation (this process's, rank 0's)."""
        records = [r for r in self.history if "peak_rss_gb" in r]
        if not records:
            return ""
        first, last = records[0], records[-1]
        shown = (f"; peak memory {first['peak_rss_gb']:.2f} GB resident at step {first['step']}, "
                 f"{last['peak_rss_gb']:.2f} GB at the end")
        if "peak_gpu_memory_gb" in last:
            shown += f" (GPU: {first['peak_gpu_memory_gb']:.2f} GB, then {last['peak_gpu_memory_gb']:.2f} GB)"
        return shown

    def raise_if_failed(self) -> None:
        """Stop a notebook's Run All (and fail papermill) after a bad-loss streak or an OOM at
        micro-batch 1; the emergency checkpoint is already saved."""
        if self.stop_reason in (StopReason.BAD_LOSS, StopReason.OUT_OF_MEMORY):
            raise RuntimeError(self.describe())
