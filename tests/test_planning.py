"""A run fitted to its time budget: the plan from timed steps, kept in the checkpoint, resumed
exactly, and the same on every rank."""
import dataclasses
import math
import signal

import pytest
import torch
from conftest import tiny_params

from nblib import data, model
from nblib.setup import hardware, params
from nblib.training import checkpoint, loop, planning, schedule, state, stopping


class Clock:
    """Seconds that pass only when read: one a reading, so a step (two readings) takes a second."""

    def __init__(self, start: float = 1_000_000.0):
        self.now = start

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def timed(budget: stopping.TimeBudget, clock: Clock, work: str, seconds: float) -> None:
    with budget.timing(work):
        clock.now += seconds - 1.0  # the timing's second reading adds the last second


def test_the_plan_holds_the_steps_the_budget_leaves_after_what_follows_training():
    clock = Clock()
    budget = stopping.TimeBudget(minutes=100, started_at=clock.now, clock=clock)
    for seconds in (60, *[2.0] * 9):  # a first step of a minute (compile), then 2 s each
        timed(budget, clock, "step", seconds)
    plan = planning.fit(budget, step=10, cap=10**6, eval_steps=100, save_steps=100, after_training=120.0)
    elapsed = clock.now - budget.started_at
    margin = planning.MARGIN_SHARE * 6000
    assert plan.step_seconds == 2.0 and plan.after_seconds == 120.0 + margin
    assert plan.total_steps == 10 + int((6000 - elapsed - 120 - margin) / 2.0)
    assert "schedule fitted: " in plan.describe() and "s/step, ends near" in plan.describe()
    assert planning.fit(budget, 10, cap=500, eval_steps=100, save_steps=100, after_training=0).total_steps == 500


def test_a_measured_speed_off_the_plan_by_a_quarter_plans_again():
    clock = Clock()
    budget = stopping.TimeBudget(minutes=100, started_at=clock.now, clock=clock)
    for _ in range(10):
        timed(budget, clock, "step", 2.0)
    plan = planning.fit(budget, 10, 10**6, eval_steps=10, save_steps=100, after_training=0)
    timed(budget, clock, "eval", 4.0)  # 0.4 s a step more: 20% off, kept
    assert not planning.drifted(plan, budget, eval_steps=10, save_steps=100)
    timed(budget, clock, "eval", 8.0)
    timed(budget, clock, "eval", 8.0)  # median 8 s: 0.8 s a step more, 40% off
    assert planning.drifted(plan, budget, eval_steps=10, save_steps=100)


def test_a_budget_too_short_to_plan_in_is_refused_at_setup_with_the_minimum():
    assert planning.setup_problem(10, started_at=0, now=60) is None
    problem = planning.setup_problem(1.5, started_at=0, now=60)
    assert "leaves 30 s of this session" in problem and "raise time_budget_minutes to at least 3.0" in problem
    assert "needs a time budget" in planning.setup_problem(0, started_at=0, now=60)
    with pytest.raises(ValueError, match="fit_to_budget=True needs a time budget"):
        params.resolve({"preset": "smoke", "fit_to_budget": True})


def fitted_run(tmp_path, wikitext_file, tokenizer_dir, monkeypatch, name: str, stop_after: int = 0):
    """A tiny run with fit_to_budget (3 minutes) on a clock that moves a second an optimizer step
    and stands still otherwise; `stop_after`: SIGTERM during the step after that one (the state
    is saved after it, as a kill's newest checkpoint would hold it)."""
    clock = StepClock()
    monkeypatch.setattr(stopping.TimeBudget, "__init__", _with_clock(clock))
    step = loop.optimizer_step

    def timed_step(state, *args, **kwargs):
        if stop_after and state.step == stop_after:
            signal.raise_signal(signal.SIGTERM)
        clock.now += 1.0
        return step(state, *args, **kwargs)

    monkeypatch.setattr(loop, "optimizer_step", timed_step)
    values = tiny_params(tmp_path, dataset=str(wikitext_file), tokenizer=str(tokenizer_dir), max_steps=0,
                         epochs=50, eval_steps=10, save_steps=5, max_checkpoints=40, fit_to_budget=True,
                         time_budget_minutes=3, resume_from_checkpoint="auto", output_dir=str(tmp_path / name))
    cfg = dataclasses.replace(params.resolve(values), started_at=clock.now)
    state.seed_everything(cfg.train.seed)
    corpus = data.prepare(cfg)
    result = loop.run(cfg, hardware.detect("fp32"), model.build(cfg.model, corpus.tokenizer), corpus)
    monkeypatch.undo()
    return result


class StepClock:
    def __init__(self):
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _with_clock(clock):
    init = stopping.TimeBudget.__init__

    def __init__(self, *args, **kwargs):
        init(self, *args, **{**kwargs, "clock": clock})
    return __init__


def test_a_fitted_run_ends_at_the_schedules_floor_keeps_its_plan_and_resumes_exactly(
        tmp_path, wikitext_file, tokenizer_dir, monkeypatch):
    whole = fitted_run(tmp_path, wikitext_file, tokenizer_dir, monkeypatch, "whole")
    fitted = [e for r in whole.history for e in r.events if e["event"] == "schedule fitted"]
    assert fitted and fitted[0]["step"] == planning.FIT_AFTER_STEPS
    total = whole.total_steps
    assert whole.state.step == total == fitted[-1]["total_steps"]
    # 180 s, less the 10 timed, the export's 15 and the margin's 20, at a second a step plus the
    # estimated evaluations' share: at most 145 steps, a good part of them
    assert 100 <= total <= 10 + (180 - 10 - planning.EXPORT_SECONDS - planning.MARGIN_SECONDS)
    last_lr = whole.history[-1].learning_rate
    assert last_lr == pytest.approx(whole.state.schedule.peak * schedule.MIN_LR_RATIO)  # the floor, at the end
    saved = checkpoint.load(checkpoint.list_checkpoints(tmp_path / "whole" / "checkpoints")[-1][1])
    assert saved["planned_steps"] == total

    cut = fitted_run(tmp_path, wikitext_file, tokenizer_dir, monkeypatch, "split", stop_after=17)
    assert cut.stop_reason is loop.StopReason.INTERRUPTED and cut.state.step == 18
    assert checkpoint.load(tmp_path / "split" / checkpoint.EMERGENCY)["planned_steps"] == total
    resumed = fitted_run(tmp_path, wikitext_file, tokenizer_dir, monkeypatch, "split")
    assert resumed.state.step == total
    assert resumed.state.step_losses == whole.state.step_losses  # bitwise
    for name, tensor in whole.state.model.state_dict().items():
        assert torch.equal(resumed.state.model.state_dict()[name], tensor), name
    assert all(math.isfinite(loss) for loss in whole.state.step_losses)


RANK_CLOCKS = """import sys
import nblib.training.loop as loop
from nblib.training import stopping

# Each optimizer step takes a second on rank 0 and half as long on rank 1: alone, rank 1 would plan more steps,
# and wait at the next collective for a rank 0 that had stopped.
_now = [1_000_000.0]
_step = loop.optimizer_step

def _timed_step(state, *args, **kwargs):
    _now[0] += 1.0 if state.rank == 0 else 0.5
    return _step(state, *args, **kwargs)

loop.optimizer_step = _timed_step
_init = stopping.TimeBudget.__init__

def _init_with_clock(self, minutes, started_at, *args, **kwargs):
    _init(self, minutes, _now[0], *args, **{**kwargs, "clock": lambda: _now[0]})

stopping.TimeBudget.__init__ = _init_with_clock
"""


@pytest.mark.slow
def test_every_rank_trains_to_rank_0s_plan(tmp_path, wikitext_file, tokenizer_dir, monkeypatch):
    """Two gloo processes whose steps take 1 s and 0.5 s: rank 0 plans, and both stop at its count
    (ranks that disagreed would wait on each other at the next collective)."""
    from conftest import sitecustomize

    from nblib.training import launch
    sitecustomize(tmp_path, monkeypatch, RANK_CLOCKS)
    values = tiny_params(tmp_path, dataset=str(wikitext_file), tokenizer=str(tokenizer_dir), max_steps=0,
                         epochs=50, eval_steps=10, save_steps=5, fit_to_budget=True, time_budget_minutes=3,
                         batch_size=4, gradient_accumulation_steps=2)
    cfg = params.resolve(values)
    corpus = data.prepare(cfg)
    result = launch.fit(cfg, hardware.detect("fp32", devices=2), model.build(cfg.model, corpus.tokenizer), corpus)
    saved = checkpoint.load(checkpoint.list_checkpoints(tmp_path / "run" / "checkpoints")[-1][1])
    assert result.stop_reason is loop.StopReason.COMPLETED and saved["world_size"] == 2
    assert saved["step"] == saved["planned_steps"] == result.total_steps
    assert 100 <= saved["planned_steps"] <= 145  # rank 0's plan at a second a step (rank 1's: about twice)
