import os
import pickle

import pytest
import torch

from nblib import checkpoint


def fake(step, **extra):
    return {"step": step, "model_state_dict": {"w": torch.ones(2)}, **extra}


def test_rotation_keeps_newest_by_step_not_mtime(tmp_path):
    directory = tmp_path / "checkpoints"
    for step in (100, 900, 1000, 200, 30):
        checkpoint.save(checkpoint.checkpoint_path(tmp_path, 0, step), fake(step))
    os.utime(directory / "checkpoint_epoch0_step30.pt", (4e9, 4e9))  # newest mtime, oldest step
    (tmp_path / checkpoint.BEST_MODEL).write_bytes(b"best")
    checkpoint.rotate(directory, keep=2)
    assert [s for s, _ in checkpoint.list_checkpoints(directory)] == [900, 1000]
    assert (tmp_path / checkpoint.BEST_MODEL).read_bytes() == b"best"


def test_load_is_weights_only_and_rejects_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        torch.save({"step": 1, "payload": Evil()}, f)
    with pytest.raises(checkpoint.CheckpointError, match="unsafe pickle"):
        checkpoint.load(path)
    assert not (tmp_path / "pwned").exists()


def test_truncated_checkpoint_is_reported_and_auto_falls_back(tmp_path, caplog):
    for step in (10, 20):
        checkpoint.save(checkpoint.checkpoint_path(tmp_path, 0, step), fake(step))
    newest = checkpoint.checkpoint_path(tmp_path, 0, 20)
    newest.write_bytes(newest.read_bytes()[:100])
    with pytest.raises(checkpoint.CheckpointError, match="truncated or corrupt"):
        checkpoint.load(newest)
    path, ckpt = checkpoint.find_resume(tmp_path, "auto")
    assert ckpt["step"] == 10 and "step20" in caplog.text


def test_auto_prefers_a_newer_emergency_checkpoint(tmp_path):
    checkpoint.save(checkpoint.checkpoint_path(tmp_path, 0, 10), fake(10))
    checkpoint.save(tmp_path / checkpoint.EMERGENCY, fake(13))
    path, ckpt = checkpoint.find_resume(tmp_path, "auto")
    assert path.name == checkpoint.EMERGENCY and ckpt["step"] == 13


def test_auto_with_nothing_starts_fresh(tmp_path):
    assert checkpoint.find_resume(tmp_path, "auto") is None
    assert checkpoint.find_resume(tmp_path, "") is None


def test_mismatching_config_is_refused_naming_the_keys(tmp_path):
    run = {"model": {"n_embd": 64, "vocab_size": 512}, "data": {"tokenizer": "bpe:512"}}
    saved = {"config": {"model": {"n_embd": 128, "vocab_size": 512}, "data": {"tokenizer": "gpt2"}}}
    with pytest.raises(checkpoint.CheckpointError, match=r"model.n_embd: checkpoint 128, run 64") as e:
        checkpoint.check_compatible(saved, run, tmp_path / "c.pt")
    assert "data.tokenizer" in str(e.value) and "vocab_size" not in str(e.value)
