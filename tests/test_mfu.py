import math

import pytest
import torch
from conftest import tiny_params

from nblib.monitoring import mfu
from nblib.setup import hardware, params


def gpu(name: str, precision: str = "fp16") -> hardware.Device:
    return hardware.Device(torch.device("cuda", 0), precision, gpu_name=name)  # no GPU needed to build one


@pytest.mark.parametrize("name, precision, peak", [
    ("Tesla T4", "fp16", 65e12),
    ("Tesla T4", "fp32", 8.1e12),
    ("NVIDIA L4", "bf16", 121e12),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312e12),
    ("NVIDIA A100 80GB PCIe", "fp16", 312e12),
    ("NVIDIA H100 80GB HBM3", "bf16", 989e12),  # SXM
    ("NVIDIA H100 PCIe", "bf16", 756e12),
    ("NVIDIA H100 NVL", "fp16", 835e12),
    ("NVIDIA H200", "bf16", 989e12),
    ("NVIDIA H200 NVL", "bf16", 835e12),
])
def test_a_known_gpu_gets_its_datasheet_peak_by_whole_model_name(name, precision, peak):
    assert mfu.peak_flops(gpu(name, precision)) == (peak, f"{name} datasheet")


@pytest.mark.parametrize("name, precision", [("NVIDIA L40S", "bf16"),  # not an L4
                                             ("NVIDIA A100-SXM4-80GB", "fp32"),  # no fp32 figure
                                             ("NVIDIA GH200 480GB", "bf16")])  # not an H200
def test_any_other_gpu_or_precision_is_measured(monkeypatch, name, precision):
    asked = []
    monkeypatch.setattr(mfu, "_measured", lambda *key: asked.append(key) or 1e12)
    assert mfu.peak_flops(gpu(name, precision)) == (1e12, "measured matmul")
    assert asked == [("cuda", precision, torch.get_num_threads())]


def test_flops_per_token_is_the_hand_count(tmp_path):
    cfg = params.resolve(tiny_params(tmp_path, n_layer=2, n_embd=32, n_inner=64, max_length=16))
    vocab = 300
    attention = 3 * 32 * 32 + 32 * 32  # q, k, v, then the output projection: 4 x n_embd^2
    mlp = 32 * 64 + 64 * 32  # up to n_inner and back
    per_layer = attention + mlp  # 8192
    lm_head = vocab * 32  # tied with the embedding: one matmul counted once
    attention_scores = 12 * 2 * 16 * 32  # 12 x layers x T x n_embd
    assert mfu.flops_per_token(cfg, vocab) == 6 * (per_layer * 2 + lm_head) + attention_scores == 168_192


def test_an_mfu_above_100_percent_is_never_a_figure():
    assert mfu.utilisation(1000, 1e9, peak=4e12, world_size=1) == pytest.approx(0.25)
    assert mfu.utilisation(1000, 1e9, peak=1e12, world_size=4) == pytest.approx(0.25)
    achieved = 2000 * 1e9  # FLOP/s: tokens/s x FLOPs per token
    too_low = mfu.utilisation(2000, 1e9, peak=achieved / 1.445, world_size=1)  # the 144.5% once logged
    assert math.isnan(too_low)
    assert mfu.shown(too_low) == "n/a" and mfu.shown(1.445) == "n/a (measured peak too low)"
    assert mfu.shown(0.312) == "31.2%" and mfu.shown(1.0) == "100.0%" and mfu.shown(math.nan) == "n/a"


def test_the_best_of_the_timings_is_taken_each_timed_on_its_own():
    clock = iter([0.0, 3.0, 10.0, 11.0, 20.0, 22.0])  # three timings: 3 s, 1 s, 2 s
    calls = []
    assert mfu.best_time(lambda: calls.append(1), repeats=3, seconds=math.inf, timer=lambda: next(clock)) == 1.0
    assert len(calls) == 3


def test_the_timings_stop_after_the_time_allowed_but_not_before_min_repeats():
    ticks = iter(range(1000))  # every timing takes 1 s

    def timer():
        return float(next(ticks))

    calls = []
    mfu.best_time(lambda: calls.append(1), repeats=50, seconds=5, timer=timer)
    assert len(calls) == 5
    calls.clear()
    mfu.best_time(lambda: calls.append(1), repeats=50, seconds=0, timer=timer)
    assert len(calls) == mfu.MIN_REPEATS


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_measuring_the_peak_leaves_trainings_random_streams_alone(precision):
    """A resume must stay bitwise: the measurement draws its operands from a generator of its own."""
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    peak = mfu.matmul_peak(hardware.DTYPES[precision])
    assert torch.equal(torch.get_rng_state(), before)
    assert 1e8 < peak < 1e14  # a CPU's: above 0.1 GFLOP/s, below 100 TFLOP/s
