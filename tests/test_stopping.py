import signal
import time

import pytest

from nblib.setup import params
from nblib.training import stopping


def test_steps_evaluations_and_saves_are_timed_apart():
    """An evaluation or a save never enters the step average (before, each left a ~0 s step)."""
    readings = iter([0, 1, 1, 31, 31, 32, 32, 52, 52, 53])
    budget = stopping.TimeBudget(minutes=10, started_at=0, clock=lambda: next(readings))
    for work in ("step", "eval", "step", "save", "step"):
        with budget.timing(work):
            pass
    assert (budget.step_seconds, budget.eval_seconds, budget.save_seconds) == (1, 30, 20)


def test_time_budget_stops_while_a_step_save_and_export_still_fit():
    budget = stopping.TimeBudget(minutes=1, started_at=time.time() - 40)
    budget.step_times.append(1.0)
    budget.save_seconds = 2.0
    assert budget.reserve_seconds() == pytest.approx(3 * 2.0 + 2 * 1.0 + 10)  # no evaluation yet
    assert not budget.exhausted()  # 20 s left > 1 + 18
    budget.save_seconds = 3.0
    assert budget.exhausted()  # 20 s left < 1 + 21
    assert not stopping.TimeBudget(minutes=0, started_at=0).exhausted()


def test_sigterm_sets_the_flag_and_a_second_sigint_raises():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}  # whatever ran before set them
    flag = stopping.InterruptFlag()
    with flag.installed():
        signal.raise_signal(signal.SIGTERM)
        assert flag and flag.signal_name == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert {s: signal.getsignal(s) for s in before} == before  # the previous handlers are back


def test_a_data_parallel_worker_never_escalates_a_repeated_signal():
    flag = stopping.InterruptFlag(escalate=False)
    with flag.installed():
        signal.raise_signal(signal.SIGTERM)  # forwarded by the notebook's process
        signal.raise_signal(signal.SIGINT)  # and the interrupt button's, through the process group
        assert flag.signal_name == "SIGTERM"


def test_the_session_clock_is_the_containers_on_kaggle_and_this_processs_elsewhere(monkeypatch):
    import os

    from nblib.setup import paths
    assert paths.session_started_at() == paths.process_started_at(os.getpid()) <= time.time()
    assert params.resolve({"preset": "smoke"}).started_at == paths.session_started_at()  # setup re-run: same clock
    monkeypatch.setattr(paths, "on_kaggle", lambda: True)
    assert paths.session_started_at() == paths.process_started_at(1) < paths.process_started_at(os.getpid())


def test_a_budget_spent_before_the_first_step_is_an_error_not_an_untrained_export():
    spent = stopping.TimeBudget(minutes=10, started_at=time.time() - 11 * 60)
    with pytest.raises(RuntimeError, match=r"time_budget_minutes=10\) counted from this session's start .* "
                                           r"used up before the first step"):
        spent.refuse_if_spent()
    stopping.TimeBudget(minutes=10, started_at=time.time()).refuse_if_spent()


def test_the_session_clock_forecasts_where_the_budget_stops_the_run():
    now = [1000.0]
    budget = stopping.TimeBudget(minutes=60, started_at=1000.0, clock=lambda: now[0])
    budget.step_times.append(2.0)
    budget.eval_times.append(30.0)
    budget.save_seconds = 10.0
    forecast = budget.forecast(step=100, total_steps=10_000, eval_steps=100, save_steps=100)
    per_step = 2.0 + 0.3 + 0.1
    assert forecast.seconds_needed == pytest.approx(9_900 * per_step)
    assert forecast.seconds_left == pytest.approx(3600 - budget.reserve_seconds())
    assert forecast.last_step == 100 + int(forecast.seconds_left / per_step)
    assert "the run will stop near step 1,556 of 10,000" in forecast.describe()
    assert "continue in the next session" in forecast.describe() and set(forecast.postfix()) == {"end", "left"}
    assert "the run ends near" in budget.forecast(9_990, 10_000, 100, 100).describe()
    unlimited = stopping.TimeBudget(minutes=0, started_at=0, clock=lambda: 0.0)
    assert "(no time budget)" in unlimited.forecast(0, 10, 5, 5).describe()  # nothing timed yet: no error


def test_warm_up_and_compile_stay_out_of_the_forecast():
    """A first step of a minute (CUDA warm-up, torch.compile) and 1 s steps after; a first
    evaluation of 30 s and 5 s ones after: the step-5 forecast counts 1 s a step, and the
    reserve keeps 5 s evaluations."""
    now = [1000.0]
    budget = stopping.TimeBudget(minutes=600, started_at=1000.0, clock=lambda: now[0])

    def timed(work, seconds):
        with budget.timing(work):
            now[0] += seconds

    for seconds in (60, 1, 1, 1, 1):
        timed("step", seconds)
    assert budget.step_seconds == 1.0
    forecast = budget.forecast(step=5, total_steps=1005, eval_steps=10**6, save_steps=10**6)
    assert forecast.seconds_needed == pytest.approx(1000)  # 1 s a step, not the first step's minute
    for seconds in (30, 5, 5):
        timed("eval", seconds)
    assert budget.eval_seconds == 5.0
    assert budget.reserve_seconds() == pytest.approx(2 * 5 + 2 * 1 + 10)
