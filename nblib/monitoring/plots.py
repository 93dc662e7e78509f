"""Training curves: loss, validation perplexity and learning rate against step; saved beside the
run, and redrawn live in the train cell at each evaluation."""
from __future__ import annotations

import io
from pathlib import Path

import matplotlib.pyplot as plt

from nblib import files
from nblib.history import Record

CURVES = "training_curves.png"


def figure(history: list[Record]):
    """The three panels of the history: loss (train and validation), validation perplexity, and
    the learning rate."""
    steps = [r.step for r in history]
    fig, (loss_ax, ppl_ax, lr_ax) = plt.subplots(1, 3, figsize=(14, 3.8))
    loss_ax.plot(steps, [r.train_loss for r in history], marker=".", label="train")
    loss_ax.plot(steps, [r.val_loss for r in history], marker=".", label="validation")
    loss_ax.set(xlabel="optimizer step", ylabel="loss", title="Loss")
    loss_ax.legend()
    ppl_ax.plot(steps, [r.val_perplexity for r in history], marker=".", color="tab:orange")
    ppl_ax.set(xlabel="optimizer step", ylabel="perplexity", title="Validation perplexity", yscale="log")
    lr_ax.plot(steps, [r.learning_rate for r in history], marker=".", color="tab:green")
    lr_ax.set(xlabel="optimizer step", ylabel="learning rate", title="Learning rate")
    fig.tight_layout()
    return fig


def curves(history: list[Record], run_dir: Path):
    """Plot the history and write `run_dir/training_curves.png`; returns the figure."""
    fig = figure(history)
    files.atomic_write(Path(run_dir) / CURVES, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    return fig


class LiveCurves:
    """The curves in one display of the running cell, replaced at each evaluation (the cell's
    other output stays; a saved notebook keeps the last picture). Outside a Jupyter kernel, a
    script or a worker process, nothing is drawn."""

    def __init__(self):
        self._handle = None

    def update(self, history: list[Record]) -> None:
        if not history or not _in_kernel():
            return
        from IPython.display import Image, display

        fig = figure(history)
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=80)
        plt.close(fig)  # drawn once, here: not again by the inline backend at the cell's end
        image = Image(data=png.getvalue(), format="png")
        if self._handle is None:
            self._handle = display(image, display_id=True)
        else:
            self._handle.update(image)


def _in_kernel() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    return getattr(get_ipython(), "kernel", None) is not None
