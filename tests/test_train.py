import math
from dataclasses import replace
from functools import partial

import numpy as np
import pytest
import torch
from conftest import tiny_params

from nblib import data, model
from nblib.setup import hardware, params
from nblib.training import checkpoint, loop, state, stopping


def run_tiny(cfg):
    state.seed_everything(cfg.train.seed)
    corpus = data.prepare(cfg)
    net = model.build(cfg.model, corpus.tokenizer)
    return loop.run(cfg, hardware.detect(cfg.train.precision), net, corpus), net


def test_epoch_order_is_seeded_and_covers_every_block_once():
    order = loop.epoch_order(100, seed=3, epoch=1)
    assert sorted(order) == list(range(100))
    assert np.array_equal(order, loop.epoch_order(100, seed=3, epoch=1))
    assert not np.array_equal(order, loop.epoch_order(100, seed=3, epoch=2))


def test_too_little_data_for_one_step_is_a_clear_error(tiny_config):
    with pytest.raises(ValueError, match="fewer than one optimizer step"):
        loop.total_steps(tiny_config, n_train_blocks=3, global_batch=tiny_config.train.global_batch)


def test_run_trains_evaluates_saves_and_rotates(tiny_config):
    result, _ = run_tiny(tiny_config)
    out = tiny_config.output_dir
    assert result.stop_reason is loop.StopReason.COMPLETED and result.state.step == 12
    history = result.history
    assert [r.step for r in history] == [4, 8, 12]
    assert history[-1].val_loss < history[0].val_loss
    assert all(math.isfinite(r.train_loss) for r in history)
    keys = {"epoch", "step", "tokens_seen", "train_loss", "val_loss", "val_perplexity",
            "learning_rate", "grad_norm", "tokens_per_second", "elapsed_seconds", "timestamp", "samples"}
    assert all(keys <= set(r.to_dict()) for r in history)
    assert all(math.isfinite(r.grad_norm) and r.grad_norm > 0 for r in history)
    assert 0.1 < history[0].peak_rss_gb <= history[-1].peak_rss_gb < 24  # GB, this process's
    assert f"GB resident at step 4, {history[-1].peak_rss_gb:.2f} GB at the end" in result.describe()
    prompt, = tiny_config.sampling.prompts
    assert all(len(r.samples) == 1 and r.samples[0].startswith(prompt) for r in history)
    assert [p.name for _, p in checkpoint.list_checkpoints(out / "checkpoints")] == [
        "checkpoint_epoch0_step8.pt", "checkpoint_epoch0_step12.pt"]
    best = torch.load(out / "best_model.pt", weights_only=True)
    assert best["val_loss"] == min(r.val_loss for r in history)


def test_throughput_counts_the_training_steps_not_evaluations_or_saves(tiny_config, monkeypatch):
    """A clock that moves 1 s per reading in the loop, and 1000 s in each evaluation and save:
    each step is 1 s, so the history's tokens/s is tokens per step, whatever they cost."""
    clock = iter(range(10**6))
    monkeypatch.setattr(loop, "clock", lambda: next(clock))  # the loop's timer only
    for name in ("evaluate", "_save_checkpoint"):
        slow = getattr(loop, name)
        monkeypatch.setattr(loop, name, lambda *a, slow=slow: ([next(clock) for _ in range(1000)], slow(*a))[1])
    result, _ = run_tiny(tiny_config)
    per_step = tiny_config.train.tokens_per_step
    assert [r.tokens_per_second for r in result.history] == [per_step] * 3


def test_gradient_accumulation_matches_one_big_batch(tmp_path, wikitext_file, tokenizer_dir):
    base = tiny_params(tmp_path, dataset=str(wikitext_file), tokenizer=str(tokenizer_dir), max_steps=4, dropout=0.0,
                       eval_steps=4, save_steps=4)
    one = params.resolve({**base, "batch_size": 8, "gradient_accumulation_steps": 1,
                          "output_dir": str(tmp_path / "a")})
    four = params.resolve({**base, "batch_size": 2, "gradient_accumulation_steps": 4,
                           "output_dir": str(tmp_path / "b")})
    _, net_one = run_tiny(one)
    _, net_four = run_tiny(four)
    for a, b in zip(net_one.parameters(), net_four.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_resume_reproduces_an_uninterrupted_run(tmp_path, wikitext_file, tokenizer_dir, precision):
    """Bitwise in fp32 on CPU; the issue allows 1e-5 relative under autocast, and it is bitwise too.
    In fp16 the GradScaler's state (scale and growth tracker) comes back with the rest."""
    # dropout on, so the restored RNG state matters too
    base = tiny_params(tmp_path, dataset=str(wikitext_file), tokenizer=str(tokenizer_dir), dropout=0.1,
                       precision=precision)
    full_cfg = params.resolve({**base, "output_dir": str(tmp_path / "full")})
    full, full_net = run_tiny(full_cfg)

    stopped_at = tmp_path / "full" / "checkpoints" / "checkpoint_epoch0_step8.pt"
    resumed_cfg = params.resolve({**base, "output_dir": str(tmp_path / "resumed"),
                                  "resume_from_checkpoint": str(stopped_at)})
    resumed, resumed_net = run_tiny(resumed_cfg)

    assert resumed.state.step == full.state.step
    if precision == "fp16":
        saved = checkpoint.load(stopped_at)["scaler_state_dict"]
        assert saved["_growth_tracker"] == 8 and resumed.state.scaler.state_dict()["_growth_tracker"] == 12
        assert resumed.state.scaler.state_dict() == full.state.scaler.state_dict()
    assert resumed.state.step_losses == full.state.step_losses
    assert [r.train_loss for r in resumed.history] == [r.train_loss for r in full.history]
    assert [r.val_loss for r in resumed.history] == [r.val_loss for r in full.history]
    for a, b in zip(full_net.state_dict().values(), resumed_net.state_dict().values()):
        assert torch.equal(a, b)


def test_fresh_run_refuses_a_directory_with_checkpoints_and_auto_continues(tiny_config):
    run_tiny(tiny_config)
    with pytest.raises(ValueError, match="already holds checkpoints.*resume_from_checkpoint='auto'"):
        run_tiny(tiny_config)
    auto = params.resolve({**tiny_params(tiny_config.output_dir.parent),
                           "dataset": tiny_config.data.dataset, "tokenizer": tiny_config.data.tokenizer,
                           "resume_from_checkpoint": "auto", "max_steps": 16})
    result, _ = run_tiny(auto)
    assert [r.step for r in result.history] == [4, 8, 12, 16]


def test_a_run_that_cannot_fit_on_disk_is_refused_at_start(tiny_config, monkeypatch):
    import collections
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: usage(10**9, 10**9, 10_000))
    with pytest.raises(OSError, match=r"would need about .* GB .* lower max_checkpoints"):
        run_tiny(tiny_config)
    assert not (tiny_config.output_dir / "checkpoints").exists()


def test_time_budget_saves_a_checkpoint_and_stops(tmp_path, wikitext_file, tokenizer_dir, monkeypatch):
    clock = FakeClock()  # each reading is a second later: steps, evaluations and saves take 1 s
    monkeypatch.setattr(stopping, "TimeBudget", partial(stopping.TimeBudget, clock=clock))
    base = tiny_params(tmp_path, dataset=str(wikitext_file), tokenizer=str(tokenizer_dir),
                       max_steps=100_000, save_steps=10_000, time_budget_minutes=1)
    result, _ = run_tiny(replace(params.resolve(base), started_at=0.0))
    assert result.stop_reason is loop.StopReason.TIME_BUDGET
    assert 0 < result.state.step < 20 and clock.now < 60
    assert "stopped at the time budget at step" in result.describe()
    saved = checkpoint.list_checkpoints(result.run_dir / "checkpoints")
    assert [s for s, _ in saved] == [result.state.step]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def test_continuing_across_kaggle_sessions(tmp_path, wikitext_file, tokenizer_dir, monkeypatch):
    """Session 1 stops; its output is attached read-only as /kaggle/input/<version>; session 2
    starts with an empty /kaggle/working and resume_from_checkpoint='auto'."""
    import shutil

    from nblib.setup import paths
    base = tiny_params(tmp_path, dataset=str(wikitext_file), tokenizer=str(tokenizer_dir),
                       resume_from_checkpoint="auto", max_steps=24, max_checkpoints=2)
    full, _ = run_tiny(params.resolve({**base, "output_dir": str(tmp_path / "uninterrupted")}))

    session1 = tmp_path / "session1"
    checks = iter(range(1000))
    with monkeypatch.context() as patch:  # the budget runs out after 13 steps (one check before the first)
        patch.setattr(stopping.TimeBudget, "exhausted", lambda self: next(checks) >= 14)
        stopped, _ = run_tiny(params.resolve({**base, "output_dir": str(session1)}))
    assert stopped.stop_reason is loop.StopReason.TIME_BUDGET and stopped.state.step == 13
    attached = tmp_path / "input" / "my-notebook-version-1"
    shutil.copytree(session1, attached)
    monkeypatch.setattr(paths, "KAGGLE_INPUT", tmp_path / "input")
    monkeypatch.setattr(data.cache, "build_cache", lambda *a: pytest.fail("tokenized again"))

    working = tmp_path / "working"
    resumed, _ = run_tiny(params.resolve({**base, "output_dir": str(working)}))
    assert resumed.state.step == 24
    assert [s for s, _ in checkpoint.list_checkpoints(working / "checkpoints")] == [20, 24]
    assert sorted(p.name for p in (attached / "checkpoints").iterdir()) == sorted(
        p.name for p in (session1 / "checkpoints").iterdir())  # the input is left alone
    assert not (working / "data_cache").exists()  # the attached cache was used
    assert [r.step for r in resumed.history] == [4, 8, 12, 13, 16, 20, 24]  # 13: where session 1 stopped
    assert resumed.state.step_losses == full.state.step_losses
