"""Progress bars and live curves: in the process that trains, or rank 0's drawn by the notebook's
process; and the window of training steps whose losses and throughput the bar and the history show.

A worker process that shows its progress through its parent says so once (`send_to`), as it
sends its log records there; the loop just asks for a `bar`.
"""
from __future__ import annotations

import dataclasses
import math

from tqdm.auto import tqdm

from nblib.history import Record
from nblib.monitoring.plots import LiveCurves

_parent = None  # the launcher's queue, in a worker whose bar the parent draws


def send_to(messages) -> None:
    """Draw this process's bars in the parent: `messages` is the launcher's queue."""
    global _parent
    _parent = messages


def bar(total: int | None, initial: int, disable: bool = False):
    """A progress bar over optimizer steps: tqdm here, or one the parent draws (see `send_to`);
    none when `disable` (the ranks above 0)."""
    if _parent is not None and not disable:
        return ProgressToParent(_parent, total, initial)
    return tqdm(total=total, initial=initial, desc="training", unit="step", mininterval=2.0,
                dynamic_ncols=True, disable=disable)


class Curves:
    """The run's curves, redrawn at each evaluation: in this kernel's cell, or by the parent
    that draws this worker's bar (see `send_to`)."""

    def __init__(self):
        self._live = LiveCurves() if _parent is None else None

    def update(self, history: list[Record]) -> None:
        if _parent is not None:
            _parent.put(("curves", [dataclasses.replace(r, samples=[]) for r in history]))
        else:
            self._live.update(history)


class ProgressToParent:
    """Rank 0's progress bar: the parent draws it (a widget in Jupyter, lines under papermill)."""

    def __init__(self, messages, total: int, initial: int):
        self.messages, self.total, self.n, self.postfix = messages, total, initial, {}

    def __enter__(self) -> ProgressToParent:
        self.messages.put(("start", {"total": self.total, "initial": self.n}))
        return self

    def __exit__(self, *exc) -> None:
        pass

    def set_postfix(self, postfix: dict, refresh: bool = False) -> None:
        self.postfix = postfix

    def update(self, n: int = 1) -> None:
        self.n += n
        self.messages.put(("progress", {"step": self.n, "total": self.total, "postfix": self.postfix}))


class Window:
    """Training losses and throughput since the last evaluation. The throughput counts the
    training steps' own time: evaluations, samples and checkpoint saves are left out."""

    def __init__(self):
        self.losses: list[float] = []
        self.grad_norms: list[float] = []
        self.tokens, self.seconds = 0, 0.0

    def count(self, stats, tokens: int, seconds: float) -> None:
        """One optimizer step: its tokens and seconds, and (when it was applied) its loss and norm."""
        self.tokens, self.seconds = self.tokens + tokens, self.seconds + seconds
        if stats.applied:
            self.losses.append(stats.loss)
            self.grad_norms.append(stats.grad_norm)

    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else math.nan

    def reset(self) -> None:
        self.__init__()
