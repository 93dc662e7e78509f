import os

import pytest
import torch

from nblib.training import checkpoint


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


def test_a_flipped_bit_inside_a_tensor_is_caught_by_the_checksum(tmp_path):
    path = tmp_path / "c.pt"
    checkpoint.save(path, fake(5, big=torch.arange(200_000, dtype=torch.float32)))
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x10  # torch.load alone reads this back without complaint
    path.write_bytes(bytes(raw))
    with pytest.raises(checkpoint.CheckpointError, match="do not match the checksum"):
        checkpoint.load(path)


def test_not_enough_space_is_refused_before_writing_and_keeps_the_previous(tmp_path, monkeypatch):
    path = checkpoint.checkpoint_path(tmp_path, 0, 10)
    checkpoint.save(path, fake(10))
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: shutil_usage(free=1000))
    with pytest.raises(OSError, match="not enough space to write checkpoint_epoch0_step20.pt.*intact"):
        checkpoint.save(checkpoint.checkpoint_path(tmp_path, 0, 20), fake(20))
    assert checkpoint.load(path)["step"] == 10
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [path.name]


def test_a_failed_write_is_a_clear_error_and_leaves_no_partial_file(tmp_path, monkeypatch):
    path = checkpoint.checkpoint_path(tmp_path, 0, 10)
    checkpoint.save(path, fake(10))

    def disk_full(obj, f):
        open(f, "wb").write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="could not write .*step20.pt: No space left on device; the earlier"):
        checkpoint.save(checkpoint.checkpoint_path(tmp_path, 0, 20), fake(20))
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [path.name]


def test_auto_finds_an_earlier_sessions_output_under_kaggle_input(tmp_path, monkeypatch):
    inputs = tmp_path / "input"
    earlier = inputs / "my-training-notebook"
    checkpoint.save(checkpoint.checkpoint_path(earlier, 1, 3000), fake(3000))
    checkpoint.save(checkpoint.checkpoint_path(earlier, 0, 2000), fake(2000))
    monkeypatch.setattr(checkpoint.paths, "KAGGLE_INPUT", inputs)
    path, ckpt = checkpoint.find_resume(tmp_path / "working", "auto")
    assert ckpt["step"] == 3000 and path.is_relative_to(earlier)


def shutil_usage(free):
    import collections
    return collections.namedtuple("usage", "total used free")(10**12, 0, free)
