"""When a run must stop early: an interrupt or SIGTERM, the time budget, a streak of bad losses."""
from __future__ import annotations

import contextlib
import logging
import math
import signal
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from nblib.console import Refusal, moment, time_of_day

log = logging.getLogger(__name__)

RECENT_STEPS = 25  # the step time is their median: warm-up and compile outliers drop out
RECENT_EVALUATIONS = 5


class InterruptFlag:
    """Turns SIGINT (Jupyter's interrupt button) and SIGTERM into a flag the loop checks between
    optimizer steps, so the emergency checkpoint is never taken mid-step. A second SIGINT raises
    KeyboardInterrupt at once, for a user who really means it; not in a data-parallel worker
    (`escalate=False`), which may get the interrupt both from the terminal's process group and
    from the notebook's process and must still stop cleanly with the other ranks."""

    def __init__(self, escalate: bool = True) -> None:
        self.signal_name: str | None = None
        self.escalate = escalate

    def __bool__(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum: int, frame) -> None:
        if self.signal_name:
            if signum == signal.SIGINT and self.escalate:
                raise KeyboardInterrupt
            return
        self.signal_name = signal.Signals(signum).name
        log.info("%s received: stopping after the current optimizer step", self.signal_name)

    @contextlib.contextmanager
    def installed(self):
        """Handle the signals inside the block; the previous handlers come back afterwards."""
        if threading.current_thread() is not threading.main_thread():
            yield self  # signals reach only the main thread; nothing to install
            return
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


class BudgetSpent(Refusal, RuntimeError):
    """The time budget is used up before the first step of this session."""


@dataclass
class TimeBudget:
    """Stops training while the next step, a final checkpoint and the export still fit. `clock`
    gives the time (seconds since the epoch, as `started_at`): the tests hand it a fake one.

    A step's and an evaluation's cost is the median of the recent ones, so the first step's
    CUDA warm-up or a minute of torch.compile, and the first evaluation's warm-up, stay out of
    the forecast and the reserve once a few more have been timed."""

    minutes: float  # 0: no budget
    started_at: float  # clock() when the session started
    save_seconds: float = 0.0  # longest checkpoint save seen
    clock: Callable[[], float] = time.time
    step_times: deque = field(default_factory=lambda: deque(maxlen=RECENT_STEPS))
    eval_times: deque = field(default_factory=lambda: deque(maxlen=RECENT_EVALUATIONS))

    @property
    def step_seconds(self) -> float:
        """One optimizer step: the median of the recent ones (0 before the first)."""
        return statistics.median(self.step_times) if self.step_times else 0.0

    @property
    def eval_seconds(self) -> float:
        """One evaluation: the median of the recent ones (0 before the first)."""
        return statistics.median(self.eval_times) if self.eval_times else 0.0

    @contextlib.contextmanager
    def timing(self, work: str):
        """Time the block as one `work`: "step", "eval" or "save". Each kind has its own
        estimate, so an evaluation never counts as (or shortens) a step."""
        began = self.clock()
        yield
        seconds = self.clock() - began
        if work == "step":
            self.step_times.append(seconds)
        elif work == "eval":
            self.eval_times.append(seconds)
        else:
            self.save_seconds = max(self.save_seconds, seconds)

    def reserve_seconds(self) -> float:
        """Time kept back for a last evaluation, the final checkpoint, the best-model export and
        the test pass."""
        return 3 * self.save_seconds + 2 * self.eval_seconds + 2 * self.step_seconds + 10

    def refuse_if_spent(self) -> None:
        """Raise before the first step when no step fits any more: a run that stopped at once
        would export untrained weights as if it had trained."""
        if self.exhausted():
            began = moment(self.started_at)
            raise BudgetSpent(
                f"the time budget (time_budget_minutes={self.minutes:g}) counted from this session's "
                f"start at {began} (on Kaggle the container's, elsewhere the kernel's) is used up "
                "before the first step: continue in a new session (on Kaggle, Save Version and run "
                "it again; here, restart the kernel), or raise time_budget_minutes (0: no budget)")

    def exhausted(self) -> bool:
        if not self.minutes:
            return False
        return self.step_seconds > self.seconds_left()  # the reserve is kept out of what is left

    def seconds_left(self, now: float | None = None) -> float:
        """Seconds of the budget left for training at `now` (the clock's time if None), its
        reserve kept back; inf with no budget."""
        if not self.minutes:
            return math.inf
        elapsed = (self.clock() if now is None else now) - self.started_at
        return self.minutes * 60 - elapsed - self.reserve_seconds()

    def seconds_per_step(self, eval_steps: int, save_steps: int, eval_seconds: float = 0.0) -> float:
        """A step's measured time with its shares of an evaluation (`eval_seconds` until one is
        timed) and of a save."""
        return self.step_seconds + (self.eval_seconds or eval_seconds) / eval_steps + self.save_seconds / save_steps

    def forecast(self, step: int, total_steps: int, eval_steps: int, save_steps: int) -> Forecast:
        """Where the run will end, at the measured times of a step, an evaluation and a save."""
        per_step = self.seconds_per_step(eval_steps, save_steps)
        now = self.clock()
        needed, left = (total_steps - step) * per_step, self.seconds_left(now)
        if needed <= left:
            last = total_steps
        else:  # where the budget's time left runs out (nothing timed yet: no step is promised)
            last = min(total_steps, step + int(max(left, 0) / per_step)) if per_step else step
        return Forecast(needed, left, last, total_steps, now + min(needed, max(left, 0)))


@dataclass(frozen=True)
class Forecast:
    """The session clock: the time the remaining steps need, the budget's time left, and the step
    the run reaches in it."""

    seconds_needed: float
    seconds_left: float  # inf: no budget
    last_step: int  # total_steps, or where the budget stops the run
    total_steps: int
    ends_at: float  # the clock's time when the run (or this session's part of it) ends

    @property
    def end(self) -> str:
        """The projected end as the local time of day."""
        return time_of_day(self.ends_at)

    def describe(self) -> str:
        ends = self.end
        if math.isinf(self.seconds_left):
            return f"about {duration(self.seconds_needed)} to go, ending near {ends} (no time budget)"
        head = f"about {duration(self.seconds_needed)} needed, {duration(self.seconds_left)} left in the budget"
        if self.last_step >= self.total_steps:
            return f"{head}: the run ends near {ends}"
        return (f"{head}: the run will stop near step {self.last_step:,} of {self.total_steps:,} at about "
                f"{ends}; continue in the next session (resume_from_checkpoint='auto')")

    def postfix(self) -> dict:
        """The progress bar's fields: the budget's time left and the projected end."""
        shown = {"end": self.end}
        if not math.isinf(self.seconds_left):
            shown["left"] = duration(max(self.seconds_left, 0))
        return shown


def duration(seconds: float) -> str:
    """'14.2 h', '35 min' or '40 s'."""
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"
