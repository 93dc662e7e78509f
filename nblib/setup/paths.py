"""Where a run reads and writes: the one module that knows Kaggle's directory layout."""
from __future__ import annotations

import os
import time
from pathlib import Path

KAGGLE_WORKING = Path("/kaggle/working")
KAGGLE_INPUT = Path("/kaggle/input")
INPUT_SEARCH_DEPTH = 3  # /kaggle/input/<slug>/..., also /kaggle/input/notebooks/<user>/<slug>/...


def on_kaggle() -> bool:
    """True inside a Kaggle notebook session (the image sets this variable)."""
    return "KAGGLE_KERNEL_RUN_TYPE" in os.environ or KAGGLE_WORKING.is_dir()


def default_output_dir(preset: str) -> Path:
    """`/kaggle/working` on Kaggle, else `runs/<preset>` under the current directory."""
    return KAGGLE_WORKING if on_kaggle() else Path("runs") / preset


def session_started_at() -> float:
    """When the session's clock started (the time budget counts from it): on Kaggle the
    container's start (process 1's), the session's; elsewhere this process's (the kernel's), so
    re-running the setup cell never gives a run a fresh budget."""
    return process_started_at(1 if on_kaggle() else os.getpid()) or time.time()


def process_started_at(pid: int) -> float | None:
    """A process's start as a Unix time, from /proc (None where there is no /proc)."""
    try:
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def find_in_inputs(pattern: str) -> list[Path]:
    """Paths matching `pattern` inside attached Kaggle inputs (an earlier session's output added
    as data), up to a few folders down; empty off Kaggle."""
    if not KAGGLE_INPUT.is_dir():
        return []
    return sorted({p for depth in range(1, INPUT_SEARCH_DEPTH + 1)
                   for p in KAGGLE_INPUT.glob("/".join(["*"] * depth + [pattern]))})
