"""Atomic file writes: a kill at any instant leaves either the old file or the new one, never half."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

TEMP_MARK = ".tmp-"  # temporaries are named .<name>.tmp-<pid> beside their target
COMPLETE_MARKER = ".complete"  # written last into a directory that is whole


def temporary_path(path: Path) -> Path:
    return path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}")


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` for a temporary beside `path`, fsync it, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def write_json(path: Path, obj: Any) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2)))


def save_torch(path: Path, obj: Any) -> Path:
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_directory(path: Path, fill: Callable[[Path], None]) -> Path:
    """Fill a temporary directory, mark it complete, then swap it in for `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        fill(tmp)
        mode = _new_file_mode()
        for file in tmp.rglob("*"):
            if file.is_file():
                file.chmod(mode)  # one mode for all: transformers 5 writes model.safetensors 0600
                _fsync(file)
        (tmp / COMPLETE_MARKER).write_text("")
        _fsync(tmp / COMPLETE_MARKER)
        old = path.with_name(f".{path.name}{TEMP_MARK}old-{os.getpid()}")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(path.parent)
    return path


def sha256(path: Path) -> str:
    """The file's sha256, read in 1 MB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_complete(directory: Path) -> bool:
    return (Path(directory) / COMPLETE_MARKER).is_file()


def remove_temporaries(directory: Path) -> list[Path]:
    """Delete what interrupted writes left behind in `directory` (not recursive)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    leftovers = [p for p in directory.iterdir() if p.name.startswith(".") and TEMP_MARK in p.name]
    for p in leftovers:
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    return leftovers


def _new_file_mode() -> int:
    """The mode open() gives a new file under this process's umask (0644 usually)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
