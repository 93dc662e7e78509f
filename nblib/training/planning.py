"""A run fitted to its time budget (`fit_to_budget`): once this session's first steps are timed,
the number of steps that lets training, the last evaluation, the test split, HellaSwag and the
export all end inside `time_budget_minutes`, with a margin. The cosine schedule then spans exactly
those steps, so the last step trains at the schedule's floor; the budget's stop is the safety net,
not the plan.

The count is kept in every checkpoint (the schedule's state), so a resumed run continues to the
planned end and stays exact. The plan is made again once: when the speed an evaluation measures
is off the plan's by more than DRIFT, or when a resumed run is given another budget.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from nblib.console import time_of_day
from nblib.setup.config import NEEDS_BUDGET
from nblib.training.stopping import TimeBudget, duration

log = logging.getLogger(__name__)

FIT_AFTER_STEPS = 10  # steps of this session timed before the plan (their median drops a first, slow one)
DRIFT = 0.25  # an evaluation's measured cost per step this far off the plan's: plan once more
MARGIN_SHARE = 0.05  # of the budget, kept free at the end (at least MARGIN_SECONDS)
MARGIN_SECONDS = 20.0
EXPORT_SECONDS = 15.0  # the export, curves and samples after training, beyond the checkpoint saves
MIN_PLAN_SECONDS = 120.0  # the least budget left at setup that a plan can use (timing, training, export)


@dataclass(frozen=True)
class Plan:
    total_steps: int
    step_seconds: float  # per step, the evaluations' and saves' shares included
    after_seconds: float  # kept for what follows training: last evaluation, test split, HellaSwag, export, margin
    ends_at: float  # the clock's time when the planned steps end
    fitted_at: int  # the step the plan was made at
    cap: int = 0  # the most steps allowed (max_steps, or epochs)
    refitted: bool = False  # made again once already: kept from now on

    def describe(self) -> str:
        ends = time_of_day(self.ends_at)
        return (f"schedule fitted: {self.total_steps:,} steps at {self.step_seconds:.2f} s/step, ends near {ends}, "
                f"{duration(self.after_seconds)} kept for evaluation and export")

    def as_event(self) -> dict:
        return {"step": self.fitted_at, "event": "schedule fitted", "total_steps": self.total_steps,
                "step_seconds": round(self.step_seconds, 4), "after_seconds": round(self.after_seconds, 1)}


def fit(budget: TimeBudget, step: int, cap: int, eval_steps: int, save_steps: int, after_training: float,
        eval_seconds: float = 0.0) -> Plan:
    """The plan at `step`: as many steps as the budget's time left holds, at the measured cost of a
    step (plus its share of evaluations, measured or `eval_seconds` before the first, and saves),
    after `after_training` seconds and the margin are kept back; at most `cap`, at least this step."""
    now = budget.clock()
    per_step = budget.seconds_per_step(eval_steps, save_steps, eval_seconds)
    total_seconds = budget.minutes * 60
    after = after_training + max(MARGIN_SECONDS, MARGIN_SHARE * total_seconds)
    left = total_seconds - (now - budget.started_at) - after
    steps = step + max(0, int(left / per_step)) if per_step > 0 else cap
    total = max(step, min(steps, cap))
    return Plan(total, per_step, after, now + (total - step) * per_step, step, cap)


def estimated_eval_seconds(step_seconds: float, eval_blocks: int, global_batch: int) -> float:
    """An evaluation before one is timed: a forward pass is about a third of a training step's
    work, over eval_blocks instead of a step's blocks; doubled for the samples it also takes."""
    return 2 * step_seconds * eval_blocks / global_batch / 3


def after_training_seconds(eval_seconds: float, save_seconds: float, eval_blocks: int, test_blocks: int,
                           hellaswag_items: int) -> float:
    """What follows training: the last evaluation, the test split (in proportion to its blocks),
    HellaSwag (four endings an item, about a block's work each) and the export (twice the
    longest save, and EXPORT_SECONDS)."""
    per_block = eval_seconds / max(eval_blocks, 1)
    return eval_seconds + per_block * (test_blocks + 4 * hellaswag_items) + 2 * save_seconds + EXPORT_SECONDS


def drifted(plan: Plan, budget: TimeBudget, eval_steps: int, save_steps: int) -> bool:
    """Whether the cost per step measured now is off the plan's by more than DRIFT."""
    per_step = budget.seconds_per_step(eval_steps, save_steps)
    return abs(per_step / plan.step_seconds - 1) > DRIFT if plan.step_seconds else False


def setup_problem(minutes: float, started_at: float, now: float) -> str | None:
    """A budget too short to plan in, known at setup: its time left is under MIN_PLAN_SECONDS."""
    left = minutes * 60 - (now - started_at)
    if minutes and left >= MIN_PLAN_SECONDS:
        return None
    if not minutes:
        return NEEDS_BUDGET
    return (f"fit_to_budget=True: time_budget_minutes={minutes:g} leaves {duration(max(left, 0))} of this "
            f"session; a fitted run needs at least {duration(MIN_PLAN_SECONDS)} (its first steps are timed, then "
            f"it trains, evaluates and exports): raise time_budget_minutes to at least "
            f"{(now - started_at + MIN_PLAN_SECONDS) / 60:.1f}")
