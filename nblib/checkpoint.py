"""Checkpoint files: the guide's layout, rotation by step, safe loading and choosing what to resume."""
from __future__ import annotations

import logging
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from . import files, paths

log = logging.getLogger(__name__)

CHECKPOINT_NAME = re.compile(r"^checkpoint_epoch(\d+)_step(\d+)\.pt$")
BEST_MODEL = "best_model.pt"
EMERGENCY = "emergency_checkpoint.pt"
# Config keys whose change makes a checkpoint's weights or tokens meaningless for this run.
MUST_MATCH = {"model": ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner"),
              "data": ("tokenizer",)}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unreadable, unsafe or from another configuration."""


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_path(run_dir: Path, epoch: int, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"checkpoint_epoch{epoch}_step{step}.pt"


def save(path: Path, checkpoint: dict[str, Any]) -> Path:
    """Write atomically: a kill mid-save leaves the previous file untouched."""
    return files.save_torch(path, checkpoint)


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """(step, path) of the rotated checkpoints in `directory`, oldest step first."""
    if not Path(directory).is_dir():
        return []
    found = [(int(m.group(2)), p) for p in Path(directory).iterdir()
             if (m := CHECKPOINT_NAME.match(p.name))]
    return sorted(found)


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
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(f"{path}: refused to load, the file holds objects other than "
                              f"tensors and plain values (unsafe pickle): {error}") from error
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as error:
        raise CheckpointError(f"{path}: unreadable, truncated or corrupt ({error})") from error


def check_compatible(checkpoint: dict[str, Any], config: dict[str, Any], path: Path) -> None:
    """Refuse a checkpoint made for another model shape or tokenizer, naming what differs."""
    saved = checkpoint.get("config", {})
    differences = [
        f"{section}.{key}: checkpoint {saved[section].get(key)!r}, run {config[section].get(key)!r}"
        for section, keys in MUST_MATCH.items() for key in keys
        if section in saved and saved[section].get(key) != config[section].get(key)]
    if differences:
        raise CheckpointError(f"{path} was made by a different configuration:\n  "
                              + "\n  ".join(differences))


def candidates(run_dir: Path) -> list[Path]:
    """Resume candidates, newest step first: this run's checkpoints, its emergency checkpoint,
    and those of earlier sessions attached under /kaggle/input."""
    roots = [Path(run_dir)] + [d for d in paths.kaggle_input_dirs()]
    found = []
    for root in roots:
        for directory in [root, *root.glob("*/")]:
            found += list_checkpoints(checkpoint_dir(directory))
            emergency = directory / EMERGENCY
            if emergency.is_file():
                found.append((_step_of(emergency), emergency))
    return [p for _, p in sorted(found, key=lambda sp: sp[0], reverse=True)]


def find_resume(run_dir: Path, resume_from_checkpoint: str) -> tuple[Path, dict[str, Any]] | None:
    """Resolve `resume_from_checkpoint` ("", a path or "auto") to a loaded checkpoint.

    Raises:
        ValueError: "" (a fresh run) while `run_dir` already holds checkpoints.
        CheckpointError: an explicit path that cannot be loaded.
    """
    if resume_from_checkpoint == "":
        existing = list_checkpoints(checkpoint_dir(run_dir))
        if existing:
            raise ValueError(
                f"output_dir={str(run_dir)!r} already holds checkpoints (newest: "
                f"{existing[-1][1].name}); set resume_from_checkpoint='auto' to continue that "
                "run, or choose another output_dir for a fresh one")
        return None
    if resume_from_checkpoint != "auto":
        return Path(resume_from_checkpoint), load(Path(resume_from_checkpoint))
    for path in candidates(run_dir):
        try:
            checkpoint = load(path)
        except CheckpointError as error:
            log.warning("skipping %s", error)
            continue
        log.info("resuming from %s (step %d)", path, checkpoint["step"])
        return path, checkpoint
    return None


def _step_of(path: Path) -> int:
    try:
        return int(load(path)["step"])
    except (CheckpointError, KeyError):
        return -1  # still listed, so the corruption is reported when it is tried
