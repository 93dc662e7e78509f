"""The run's history, `training_history.json`: one typed record per evaluation, and what is measured
after training (the test loss, HellaSwag) on the last. One writer and one reader: every module
that shows the history (the summary, the model card, the run's result, the curves, the reporters)
reads `Record`s through `read`, and the loop and the evaluations write through `write` and
`add_to_last`. Checkpoints hold the same records as plain dicts (`Record.to_dict`).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nblib import files

HISTORY = "training_history.json"


@dataclass
class Record:
    """One evaluation during training, and (on the last) the results measured after it."""

    epoch: int
    step: int
    tokens_seen: int
    train_loss: float  # mean since the previous record
    val_loss: float  # on the fixed validation blocks
    learning_rate: float
    grad_norm: float  # mean since the previous record
    tokens_per_second: float  # training steps only
    mfu: float  # NaN where the device's peak was measured too low
    elapsed_seconds: float  # since this session's training began
    timestamp: str  # UTC, ISO 8601
    batch_size: int  # the micro-batch in use (an OOM back-off lowers it)
    gradient_accumulation_steps: int
    skipped_steps: int
    peak_rss_gb: float | None = None  # this process's peak resident memory
    peak_gpu_memory_gb: float | None = None
    events: list[dict[str, Any]] = field(default_factory=list)  # OOM back-offs and applied changes since the last
    samples: list[str] = field(default_factory=list)  # the prompts' continuations
    test_loss: float | None = None  # after training: the best weights on the test split
    hellaswag_accuracy: float | None = None  # after training, with eval_hellaswag
    hellaswag_sum_accuracy: float | None = None
    hellaswag_items: int | None = None
    hellaswag_source: str | None = None

    @property
    def val_perplexity(self) -> float:
        return perplexity(self.val_loss)

    @property
    def test_perplexity(self) -> float | None:
        return None if self.test_loss is None else perplexity(self.test_loss)

    def to_dict(self) -> dict[str, Any]:
        """As JSON keeps it, the perplexities included (readers of the file see them); the
        results not measured are left out."""
        values = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        values["val_perplexity"] = self.val_perplexity
        if self.test_loss is not None:
            values["test_perplexity"] = self.test_perplexity
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Record:
        """A record from a file or checkpoint (derived and unknown keys are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def read(run_dir: Path) -> list[Record]:
    """The run's records, oldest first; [] before the first evaluation."""
    path = Path(run_dir) / HISTORY
    return [Record.from_dict(r) for r in json.loads(path.read_text())] if path.is_file() else []


def write(run_dir: Path, records: list[Record]) -> None:
    """The whole history, atomically."""
    files.write_json(Path(run_dir) / HISTORY, [r.to_dict() for r in records])


def add_to_last(run_dir: Path, **results: Any) -> None:
    """Results measured after training (`test_loss`, `hellaswag_*`) into the last record, which
    the summary and the model card read; nothing before the first evaluation."""
    records = read(run_dir)
    if records:
        records[-1] = dataclasses.replace(records[-1], **results)
        write(run_dir, records)


def best(records: list[Record]) -> Record | None:
    """The record with the lowest validation loss (the best model's)."""
    return min(records, key=lambda r: r.val_loss) if records else None
