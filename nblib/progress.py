"""Progress bars: tqdm in the process that trains, or rank 0's drawn by the notebook's process."""
from __future__ import annotations

from tqdm.auto import tqdm


def bar(total: int | None, initial: int, disable: bool = False) -> tqdm:
    return tqdm(total=total, initial=initial, desc="training", unit="step", mininterval=2.0,
                dynamic_ncols=True, disable=disable)


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
