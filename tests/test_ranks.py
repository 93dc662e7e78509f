"""Two real gloo processes on the CPU: the ranks agree on an OOM, a bad-loss streak and the time
budget when only one of them meets it, and each rank keeps a random stream of its own."""
import dataclasses
import shutil
import time

import pytest
from conftest import fake_clock, tiny_params
from faults import faulty

from nblib import data, model
from nblib.setup import hardware
from nblib.setup.params import resolve
from nblib.training import checkpoint, launch, loop, state


def fit_two(params: dict, fault: str = "", **overrides) -> loop.RunResult:
    cfg = dataclasses.replace(resolve({**params, "devices": 2}), **overrides)
    state.seed_everything(cfg.train.seed)
    corpus = data.prepare(cfg)
    net = model.build(cfg.model, corpus.tokenizer)
    return launch.fit(cfg, hardware.detect("fp32", 2), faulty(net, fault) if fault else net, corpus)


def saved_states(run_dir) -> dict[int, dict]:
    return {step: checkpoint.load(path) for step, path in
            ((int(p.stem.rsplit("step", 1)[1]), p) for _, p in checkpoint.list_checkpoints(run_dir / "checkpoints"))}


@pytest.fixture
def params(tmp_path, wikitext_file, tokenizer_dir) -> dict:
    return tiny_params(tmp_path, dataset=str(wikitext_file), tokenizer=str(tokenizer_dir), max_steps=8,
                       save_steps=2, eval_steps=4)  # the ranks compare their weights every 2 steps


def test_an_oom_on_one_rank_backs_both_off_and_the_run_completes(params):
    result = fit_two(params, fault="oom")  # 4 blocks per rank; rank 1 fits 2
    assert result.stop_reason is loop.StopReason.COMPLETED and result.state.step == 8
    assert [(e["batch_size"], e["gradient_accumulation_steps"]) for e in result.state.events
            if e["event"] == "out of memory"] == [(2, 2)]  # rank 0 backed off with rank 1
    assert (result.state.batch_size, result.state.gradient_accumulation_steps) == (2, 2)


def test_a_nan_on_one_rank_stops_both_with_the_last_good_weights(params):
    result = fit_two({**params, "max_bad_steps": 3}, fault="nan")
    assert result.stop_reason is loop.StopReason.BAD_LOSS and result.state.step == 3
    emergency = checkpoint.load(result.run_dir / checkpoint.EMERGENCY)
    assert emergency["skipped_steps"] == 3 and emergency["bad_streak"] == 3


def test_the_time_budget_stops_both_ranks_at_the_same_step(params, tmp_path, monkeypatch):
    """Rank 0's budget runs out first (its clock runs twice as fast): without agreement it would
    stop while rank 1 waits for it in the next step's collective."""
    fake_clock(tmp_path, monkeypatch)
    result = fit_two({**params, "max_steps": 100_000, "eval_steps": 50, "save_steps": 50,
                      "time_budget_minutes": 1}, started_at=time.time())
    assert result.stop_reason is loop.StopReason.TIME_BUDGET and 0 < result.state.step < 100_000
    assert max(saved_states(result.run_dir)) == result.state.step
    assert result.history[-1].step == result.state.step


def test_each_rank_draws_its_own_dropout_and_resumes_its_own_random_stream(params, tmp_path):
    whole = fit_two({**params, "dropout": 0.1, "output_dir": str(tmp_path / "whole")})
    rngs = saved_states(whole.run_dir)[8]["rank_rng_states"]
    assert len(rngs) == 2 and not (rngs[0]["torch"] == rngs[1]["torch"]).all()

    shutil.copytree(whole.run_dir, tmp_path / "resumed")
    for _, path in checkpoint.list_checkpoints(tmp_path / "resumed" / "checkpoints")[1:]:
        path.unlink()  # back to step 6, as if the session had died there
    (tmp_path / "resumed" / checkpoint.BEST_MODEL).unlink()
    resumed = fit_two({**params, "dropout": 0.1, "output_dir": str(tmp_path / "resumed"),
                       "resume_from_checkpoint": "auto"})
    assert resumed.state.step_losses == whole.state.step_losses  # bitwise: rank 1 resumed its own stream
