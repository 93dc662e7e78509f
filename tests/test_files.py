import os

import pytest

from nblib import files


def test_atomic_write_replaces_whole_and_cleans_up_on_failure(tmp_path):
    target = tmp_path / "history.json"
    files.write_json(target, {"a": 1})

    def crash(tmp):
        tmp.write_text("half")
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space"):
        files.atomic_write(target, crash)
    assert target.read_text() == '{\n  "a": 1\n}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.json"]


def test_atomic_directory_is_marked_complete_and_swapped_whole(tmp_path):
    target = tmp_path / "final_model"
    files.atomic_directory(target, lambda d: (d / "v1").write_text("1"))
    files.atomic_directory(target, lambda d: (d / "v2").write_text("2"))
    assert files.is_complete(target)
    assert sorted(p.name for p in target.iterdir()) == [files.COMPLETE_MARKER, "v2"]
    with pytest.raises(KeyboardInterrupt):
        files.atomic_directory(target, lambda d: (_ for _ in ()).throw(KeyboardInterrupt))
    assert (target / "v2").is_file() and len(list(tmp_path.iterdir())) == 1


def test_leftover_temporaries_are_removed(tmp_path):
    (tmp_path / f".ckpt.pt{files.TEMP_MARK}123").write_text("x")
    (tmp_path / f".final_model{files.TEMP_MARK}9").mkdir()
    (tmp_path / "keep.pt").write_text("x")
    removed = files.remove_temporaries(tmp_path)
    assert len(removed) == 2 and os.listdir(tmp_path) == ["keep.pt"]
