"""OOM recovery through the real training loop, with the model's forward patched to run out of memory."""
import math

import pytest
import torch
from conftest import tiny_params
from test_train import run_tiny
from transformers import GPT2Model

from nblib.setup import params
from nblib.training import checkpoint, loop, oom


@pytest.fixture
def oom_above(monkeypatch):
    """Make every forward pass over more than `limit` blocks raise a CUDA-style OOM."""
    def install(limit, error=torch.OutOfMemoryError):
        forward = GPT2Model.forward

        def patched(self, input_ids=None, **kwargs):
            if input_ids.shape[0] > limit:
                raise error("CUDA out of memory. Tried to allocate 2.00 GiB")
            return forward(self, input_ids=input_ids, **kwargs)

        monkeypatch.setattr(GPT2Model, "forward", patched)
    return install


def test_oom_halves_the_micro_batch_and_keeps_the_blocks_per_step(tmp_path, wikitext_file, tokenizer_dir, oom_above):
    base = tiny_params(tmp_path, dataset=str(wikitext_file), tokenizer=str(tokenizer_dir), max_steps=8)
    direct, _ = run_tiny(params.resolve({**base, "batch_size": 4, "gradient_accumulation_steps": 4,
                                         "output_dir": str(tmp_path / "direct")}))
    oom_above(4)
    recovered, _ = run_tiny(params.resolve({**base, "batch_size": 16, "gradient_accumulation_steps": 1,
                                            "output_dir": str(tmp_path / "recovered")}))
    difference = max(abs(a - b) for a, b in zip(direct.state.step_losses, recovered.state.step_losses))
    print(f"largest per-step loss difference, recovered vs direct: {difference:.3g}")
    assert recovered.state.step == direct.state.step == 8
    assert difference <= 1e-6
    s = recovered.state
    assert (s.batch_size, s.gradient_accumulation_steps) == (4, 4)
    assert [(e["batch_size"], e["gradient_accumulation_steps"]) for e in s.events] == [(8, 2), (4, 4)]
    assert recovered.history[0].events == s.events and recovered.history[0].batch_size == 4
    saved = checkpoint.load(checkpoint.list_checkpoints(tmp_path / "recovered" / "checkpoints")[-1][1])
    assert (saved["batch_size"], saved["gradient_accumulation_steps"]) == (4, 4)


def test_resume_keeps_the_reduced_micro_batch(tmp_path, wikitext_file, tokenizer_dir, oom_above):
    base = tiny_params(tmp_path, dataset=str(wikitext_file), tokenizer=str(tokenizer_dir),
                       batch_size=16, gradient_accumulation_steps=1, max_steps=4)
    oom_above(4)
    run_tiny(params.resolve(base))
    resumed, _ = run_tiny(params.resolve({**base, "max_steps": 8, "resume_from_checkpoint": "auto"}))
    assert (resumed.state.batch_size, resumed.state.gradient_accumulation_steps) == (4, 4)
    backoffs = [e for e in resumed.state.events if e["event"] == "out of memory"]
    assert len(backoffs) == 2  # no new OOM: the saved micro-batch was used


def test_old_style_runtime_error_is_recognised_and_others_are_not():
    assert oom.is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert oom.is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert not oom.is_out_of_memory(RuntimeError("shape mismatch"))


def test_oom_at_micro_batch_one_saves_an_emergency_checkpoint_and_names_the_fix(tiny_config, oom_above):
    oom_above(0, error=lambda m: RuntimeError("CUDA error: out of memory"))
    result, _ = run_tiny(tiny_config)
    assert result.stop_reason is loop.StopReason.OUT_OF_MEMORY
    assert "reduce max_length, n_embd or n_layer" in result.describe()
    emergency = checkpoint.load(tiny_config.output_dir / checkpoint.EMERGENCY)
    assert emergency["step"] == 0 and emergency["position"] == 0  # the failed step is not lost
    assert emergency["batch_size"] == 1


def test_evaluation_oom_uses_a_smaller_eval_batch_not_a_smaller_training_batch(tiny_config, monkeypatch):
    forward = GPT2Model.forward

    def eval_oom(self, input_ids=None, **kwargs):
        if not self.training and input_ids.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return forward(self, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(GPT2Model, "forward", eval_oom)
    result, _ = run_tiny(tiny_config)
    assert result.stop_reason is loop.StopReason.COMPLETED
    assert all(math.isfinite(r.val_loss) for r in result.history)
    assert result.state.batch_size == tiny_config.train.batch_size and not result.state.events
