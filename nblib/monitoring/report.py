"""Scalars for the tools users watch: TensorBoard event files or Weights & Biases, both optional."""
from __future__ import annotations

import logging
from pathlib import Path

from nblib import history

log = logging.getLogger(__name__)


class Reporter:
    """report_to="none", and what any reporter falls back to when its tool is missing."""

    def scalars(self, values: dict[str, float], step: int) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoard(Reporter):
    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter  # ImportError without tensorboard

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def scalars(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.writer.close()


class WandB(Reporter):
    def __init__(self, wandb, run_dir: Path, config: dict):
        self.run = wandb.init(project="gpt2-text-generation", dir=str(run_dir), config=config,
                              name=Path(run_dir).name)

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


def open_reporter(report_to: str, run_dir: Path, config: dict) -> Reporter:
    """The reporter `report_to` names; with its tool missing (or W&B logged out), a message and
    the plain Reporter: the run goes on either way."""
    if report_to == "tensorboard":
        try:
            reporter = TensorBoard(Path(run_dir) / "runs")
        except ImportError:
            log.warning("report_to='tensorboard': TensorBoard is not installed (pip install "
                        "tensorboard); training continues without it")
            return Reporter()
        log.info("TensorBoard event files in %s (tensorboard --logdir %s)", Path(run_dir) / "runs",
                 Path(run_dir) / "runs")
        return reporter
    if report_to == "wandb":
        try:
            import wandb
        except ImportError:
            log.warning("report_to='wandb': wandb is not installed (pip install wandb); training "
                        "continues without it")
            return Reporter()
        if not wandb.api.api_key:
            log.warning("report_to='wandb': not logged in (run `wandb login`, or set WANDB_API_KEY, "
                        "on Kaggle as a secret); training continues without it")
            return Reporter()
        return WandB(wandb, run_dir, config)
    return Reporter()


def evaluation_scalars(record: history.Record) -> dict[str, float]:
    """What an evaluation's history record gives the reporters."""
    scalars = {"eval/loss": record.val_loss, "eval/perplexity": record.val_perplexity,
               "train/tokens_per_second": record.tokens_per_second}
    scalars.update({f"memory/{key}": getattr(record, key) for key in ("peak_rss_gb", "peak_gpu_memory_gb")
                    if getattr(record, key) is not None})
    return scalars
