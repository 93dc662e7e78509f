"""How a run ended: the stop reason, and the result the notebook prints and acts on."""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from pathlib import Path

from nblib import history
from nblib.console import TrainingFailed
from nblib.history import perplexity
from nblib.training import checkpoint
from nblib.training.state import TrainState
from nblib.training.stopping import duration


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
    first_step: int = 0  # where this session's training started (a resumed run's checkpoint)
    first_tokens: int = 0  # tokens seen before it

    @property
    def saved(self) -> Path:
        """The file holding the state training stopped in."""
        if self.stop_reason in (StopReason.COMPLETED, StopReason.TIME_BUDGET):
            return checkpoint.checkpoint_path(self.run_dir, self.state.epoch, self.state.step)
        return self.run_dir / checkpoint.EMERGENCY

    @property
    def history(self) -> list[history.Record]:
        return self.state.history

    def headline(self) -> str:
        """What happened, where the run is, and what to do next: one line."""
        s, emergency = self.state, self.run_dir / checkpoint.EMERGENCY
        at = f"at step {s.step:,} of {self.total_steps:,}"
        again = "run again to continue (resume_from_checkpoint='auto')"
        if self.stop_reason is StopReason.COMPLETED and self.steps_trained == 0:
            return (f"nothing left to train: the run in {self.run_dir} has done {s.step:,} of its "
                    f"{self.total_steps:,} steps; raise max_steps (or epochs, with max_steps=0) to train more")
        return {
            StopReason.COMPLETED: f"completed {at}",
            StopReason.TIME_BUDGET: f"stopped at the time budget {at}, checkpoint saved; in the next session, {again}",
            StopReason.INTERRUPTED: (f"interrupted by {self.signal_name or 'a signal'} {at}: saved {emergency}; "
                                     f"{again}"),
            StopReason.BAD_LOSS: (f"stopped {at} after {s.bad_streak} steps in a row with a non-finite loss: "
                                  f"saved {emergency} from the last good weights; lower learning_rate, then {again}"),
            StopReason.OUT_OF_MEMORY: (f"out of memory {at} even with a micro-batch of 1: saved {emergency}; "
                                       "reduce max_length, n_embd or n_layer"),
        }[self.stop_reason]

    @property
    def steps_trained(self) -> int:
        """Optimizer steps taken in this session (a resumed run's earlier ones not counted)."""
        return self.state.step - self.first_step

    def describe(self) -> str:
        """The headline, then this session's work and the run's best validation loss."""
        s = self.state
        lines = [self.headline()]
        if self.steps_trained:
            tokens = s.tokens_seen - self.first_tokens
            skipped = f", {s.skipped_steps:,} skipped in the run" if s.skipped_steps else ""
            lines.append(f"this session: steps {self.first_step + 1:,} to {s.step:,} ({self.steps_trained:,} steps, "
                         f"{tokens:,} tokens) in {duration(self.elapsed_seconds)}{skipped}")
        best = (f"best validation loss {s.best_val_loss:.4f} (perplexity {perplexity(s.best_val_loss):.1f})"
                if math.isfinite(s.best_val_loss) else "no evaluation yet (the first comes at eval_steps)")
        lines.append(f"the run: {best}{self._memory()}")
        return "\n".join(lines)

    def _memory(self) -> str:
        """The peak memory of the first and the last evaluation (this process's, rank 0's)."""
        records = [r for r in self.history if r.peak_rss_gb is not None]
        if not records:
            return ""
        first, last = records[0], records[-1]
        shown = (f"; peak memory {first.peak_rss_gb:.2f} GB resident at step {first.step}, "
                 f"{last.peak_rss_gb:.2f} GB at the end")
        if last.peak_gpu_memory_gb is not None:
            shown += f" (GPU: {first.peak_gpu_memory_gb:.2f} GB, then {last.peak_gpu_memory_gb:.2f} GB)"
        return shown

    def raise_if_failed(self) -> None:
        """Stop a notebook's Run All (and fail papermill) after a bad-loss streak or an OOM at
        micro-batch 1; the emergency checkpoint is already saved.

        Raises:
            console.TrainingFailed: its message the headline, with what to change.
        """
        if self.stop_reason in (StopReason.BAD_LOSS, StopReason.OUT_OF_MEMORY):
            raise TrainingFailed(self.headline())
