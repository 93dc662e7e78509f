"""Checkpoint files: the guide's layout, rotation by step, safe loading and choosing what to resume."""
from __future__ import annotations

import hashlib
import logging
import pickle
import re
import shutil
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from nblib import files
from nblib.console import ConfigError, NotEnoughSpace, Refusal
from nblib.setup import paths

log = logging.getLogger(__name__)

CHECKPOINT_NAME = re.compile(r"^checkpoint_epoch(\d+)_step(\d+)\.pt$")
BEST_MODEL = "best_model.pt"
EMERGENCY = "emergency_checkpoint.pt"


class CheckpointError(Refusal, RuntimeError):
    """A checkpoint that cannot be used: unreadable, unsafe or from another configuration."""


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_path(run_dir: Path, epoch: int, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"checkpoint_epoch{epoch}_step{step}.pt"


def save(path: Path, checkpoint: dict[str, Any]) -> float:
    """Write atomically with a checksum of its contents; returns the seconds it took.

    A kill mid-save leaves the previous file untouched, and so does a failed write.

    Raises:
        OSError: no space or no permission, with what to do about it.
    """
    started = time.perf_counter()
    path = Path(path)
    needed = estimated_size(checkpoint)
    path.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path.parent).free
    if free < needed:
        raise NotEnoughSpace(28, f"not enough space to write {path.name}: about {needed / 2**20:.0f} MB "
                      f"needed, {free / 2**20:.0f} MB free in {path.parent}; the earlier checkpoints "
                      "are intact. Free some space or lower max_checkpoints, then resume")
    try:
        files.save_torch(path, {**checkpoint, "integrity": digest(checkpoint)})
    except OSError as error:
        raise OSError(error.errno, f"could not write {path}: {error.strerror or error}; the earlier "
                      "checkpoints are intact. Free some space or fix the permissions, then resume") from error
    return time.perf_counter() - started


def estimated_size(checkpoint: dict[str, Any]) -> int:
    """Bytes the checkpoint's tensors take (tied weights counted once), plus a margin."""
    seen, total = set(), 0
    for tensor in _tensors(checkpoint):
        key = (tensor.untyped_storage().data_ptr(), tensor.numel())
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return int(total * 1.02) + 2**20


def digest(checkpoint: dict[str, Any]) -> str:
    """sha256 over every tensor's bytes and every plain value, in order: torch.load does not
    notice a flipped bit inside a tensor, this does."""
    h = hashlib.sha256()
    for key, value in _leaves(checkpoint):
        h.update(key.encode())
        if isinstance(value, torch.Tensor):
            h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        else:
            h.update(repr(value).encode())
    return h.hexdigest()


def _leaves(obj: Any, prefix: str = ""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)) and any(isinstance(v, (dict, list, tuple, torch.Tensor)) for v in obj):
        for i, v in enumerate(obj):
            yield from _leaves(v, f"{prefix}/{i}")
    else:
        yield prefix, obj


def _tensors(obj: Any):
    return (v for _, v in _leaves(obj) if isinstance(v, torch.Tensor))


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """(step, path) of the rotated checkpoints in `directory`, oldest step first."""
    if not Path(directory).is_dir():
        return []
    found = [(int(m.group(2)), p) for p in Path(directory).iterdir()
             if (m := CHECKPOINT_NAME.match(p.name))]
    return sorted(found)


def projected_bytes(model: torch.nn.Module) -> int:
    """What one checkpoint of `model` will weigh, before AdamW's moments exist: the weights and
    the two moments, all fp32, plus a margin."""
    return 3 * sum(p.numel() * p.element_size() for p in model.parameters()) + 2**20


def check_disk_budget(run_dir: Path, model: torch.nn.Module, max_checkpoints: int) -> None:
    """Log the projected peak disk use of a run and refuse one that cannot fit.

    Raises:
        OSError: the projected peak exceeds the free space (plus what the run already holds).
    """
    per_checkpoint = projected_bytes(model)
    # while rotating, one more checkpoint than kept exists; plus best, emergency and the export
    peak = (max_checkpoints + 3) * per_checkpoint + per_checkpoint // 3
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(run_dir).free + sum(p.stat().st_size for p in existing_files(run_dir))
    log.info("disk: about %.0f MB per checkpoint, projected peak %.2f GB, %.1f GB available in %s",
             per_checkpoint / 2**20, peak / 2**30, free / 2**30, run_dir)
    if peak > free:
        raise NotEnoughSpace(28, f"this run would need about {peak / 2**30:.2f} GB in {run_dir} "
                      f"({max_checkpoints} checkpoints of {per_checkpoint / 2**20:.0f} MB "
                      f"plus best, emergency and final model), but only {free / 2**30:.2f} GB are "
                      "free: lower max_checkpoints or free space")


def existing_files(run_dir: Path) -> list[Path]:
    """The checkpoint files a run directory already holds (they count as reusable space)."""
    run_dir = Path(run_dir)
    named = [run_dir / BEST_MODEL, run_dir / EMERGENCY]
    return [p for _, p in list_checkpoints(checkpoint_dir(run_dir))] + [p for p in named if p.is_file()]


def rotate(directory: Path, keep: int) -> list[Path]:
    """Delete all but the `keep` highest-step checkpoints; the best model lives elsewhere."""
    doomed = [p for _, p in list_checkpoints(directory)[:-keep]]
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed


def load(path: Path) -> dict[str, Any]:
    """Load a checkpoint onto the CPU with `weights_only=True` (never runs code from the file).

    Raises:
        CheckpointError: truncated, corrupt, or holding objects that would run code.
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(f"{path}: refused to load: its pickle is corrupt or holds objects "
                              "other than tensors and plain values (unsafe pickle; nothing was run). "
                              f"{str(error).splitlines()[-1] if str(error) else ''}") from error
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as error:
        raise CheckpointError(f"{path}: unreadable, truncated or corrupt ({error})") from error
    if not isinstance(checkpoint, dict) or "step" not in checkpoint:
        raise CheckpointError(f"{path}: not a training checkpoint (no 'step' key)")
    expected = checkpoint.pop("integrity", None)
    if expected is not None and digest(checkpoint) != expected:
        raise CheckpointError(f"{path}: corrupt, its contents do not match the checksum saved with it")
    return checkpoint


def candidates(run_dir: Path) -> list[tuple[Path, dict[str, Any] | None]]:
    """Resume candidates, newest step first: this run's checkpoints, its emergency checkpoint,
    and those of earlier sessions attached under /kaggle/input. An emergency checkpoint's step
    is inside it, so it comes already loaded (None when it would not load); the others are
    loaded when they are tried."""
    run_dir = Path(run_dir)
    directories = [checkpoint_dir(run_dir)] + paths.find_in_inputs("checkpoints")
    found = [(step, path, None) for directory in directories for step, path in list_checkpoints(directory)]
    for path in [run_dir / EMERGENCY] + paths.find_in_inputs(EMERGENCY):
        if path.is_file():
            loaded = _load_or_none(path)
            found.append((loaded["step"] if loaded else -1, path, loaded))  # -1: tried last, reported
    return [(path, loaded) for _, path, loaded in sorted(found, key=lambda f: f[0], reverse=True)]


def find_resume(run_dir: Path, resume_from_checkpoint: str,
                accept: Callable[[Path, dict[str, Any]], bool] = lambda path, saved: True,
                ) -> tuple[Path, dict[str, Any]] | None:
    """Resolve `resume_from_checkpoint` ("", a path or "auto") to a loaded checkpoint; with
    "auto", a candidate that `accept` turns down is passed over for the next older one (a path
    given explicitly is returned only if `accept` takes it).

    Raises:
        ValueError: "" (a fresh run) while `run_dir` already holds checkpoints.
        CheckpointError: an explicit path that cannot be loaded.
    """
    if resume_from_checkpoint == "":
        existing = existing_files(run_dir)
        if existing:
            raise ConfigError(
                f"output_dir={str(run_dir)!r} already holds checkpoints ({existing[-1].name}); "
                "set resume_from_checkpoint='auto' to continue that run, or choose another "
                "output_dir for a fresh one")
        return None
    if resume_from_checkpoint != "auto":
        path = Path(resume_from_checkpoint)
        saved = load(path)
        return (path, saved) if accept(path, saved) else None
    for path, checkpoint in candidates(run_dir):
        try:
            checkpoint = checkpoint or load(path)
        except CheckpointError as error:
            log.warning("skipping %s", error)
            continue
        if accept(path, checkpoint):
            return path, checkpoint
    return None


def _load_or_none(path: Path) -> dict[str, Any] | None:
    try:
        return load(path)
    except CheckpointError:
        return None  # still listed, so the corruption is reported when it is tried
