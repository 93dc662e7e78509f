"""Where a run reads and writes: the one module that knows Kaggle's directory layout."""
from __future__ import annotations

import os
from pathlib import Path

KAGGLE_WORKING = Path("/kaggle/working")
KAGGLE_INPUT = Path("/kaggle/input")


def on_kaggle() -> bool:
    """True inside a Kaggle notebook session (the image sets this variable)."""
    return "KAGGLE_KERNEL_RUN_TYPE" in os.environ or KAGGLE_WORKING.is_dir()


def default_output_dir(preset: str) -> Path:
    """`/kaggle/working` on Kaggle, else `runs/<preset>` under the current directory."""
    return KAGGLE_WORKING if on_kaggle() else Path("runs") / preset


def kaggle_input_dirs() -> list[Path]:
    """Attached inputs (datasets, earlier notebook versions' outputs); empty off Kaggle."""
    if not KAGGLE_INPUT.is_dir():
        return []
    return sorted(p for p in KAGGLE_INPUT.iterdir() if p.is_dir())
