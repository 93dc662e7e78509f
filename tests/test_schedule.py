import pytest
import torch

from nblib.training import schedule


def test_lr_warms_up_linearly_then_decays_by_cosine_to_a_tenth():
    factors = [schedule.lr_factor(s, warmup_steps=10, total_steps=110) for s in range(111)]
    assert factors[0] == pytest.approx(1 / 11) and factors[9] == pytest.approx(10 / 11)
    assert factors[10] == pytest.approx(1.0)
    assert factors[60] == pytest.approx(0.55)
    assert factors[110] == pytest.approx(schedule.MIN_LR_RATIO)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))


def test_the_schedule_sets_the_optimizers_rate_and_a_new_peak_from_a_step():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    plan = schedule.Schedule(peak=3e-3, warmup_steps=10, total_steps=110)
    plan.apply(optimizer, 60)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(3e-3 * 0.55)
    plan.peak = 1e-4  # a resumed run's learning_rate, from its step on
    plan.apply(optimizer, 60)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4 * 0.55)
