"""Training curves: loss and perplexity against step, saved beside the run."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt

from . import files

CURVES = "training_curves.png"


def curves(history: list[dict], run_dir: Path):
    """Plot the history and write `run_dir/training_curves.png`; returns the figure."""
    steps = [r["step"] for r in history]
    fig, (loss_ax, ppl_ax) = plt.subplots(1, 2, figsize=(11, 4))
    loss_ax.plot(steps, [r["train_loss"] for r in history], marker=".", label="train")
    loss_ax.plot(steps, [r["val_loss"] for r in history], marker=".", label="validation")
    loss_ax.set(xlabel="optimizer step", ylabel="loss", title="Loss")
    loss_ax.legend()
    ppl_ax.plot(steps, [r["val_perplexity"] for r in history], marker=".", color="tab:orange")
    ppl_ax.set(xlabel="optimizer step", ylabel="perplexity", title="Validation perplexity", yscale="log")
    fig.tight_layout()
    files.atomic_write(Path(run_dir) / CURVES, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    return fig
