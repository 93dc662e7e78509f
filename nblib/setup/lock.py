"""One run per `output_dir`: an exclusive lock held from the setup cell to the end of the run.

The lock is `filelock`'s (an OS `flock` on Unix), so the kernel releases it when its process dies
in any way, SIGKILL included: a lock left by a dead session never blocks the next one. Beside it,
`.nblib.lock.json` names the holder (process id, host, start time, command), so a second run is
told who has the folder. Data-parallel workers never take it: their parent holds it for them.
"""
from __future__ import annotations

import json
import os
import socket
import sys
from datetime import datetime, timezone
from pathlib import Path

from filelock import FileLock, Timeout

from nblib import files
from nblib.console import Refusal

LOCK_FILE = ".nblib.lock"
HOLDER_FILE = ".nblib.lock.json"

_held: dict[Path, FileLock] = {}  # this process's locks: re-running a cell must not lock itself out


class RunDirectoryBusy(Refusal, RuntimeError):
    """Another live process is running in this output_dir."""


def hold(output_dir: Path) -> bool:
    """Take `output_dir`'s lock for this process, then give back any other run directory this
    process held; True when it was taken now, False when this process held it already (so a
    caller releases only what it took).

    Raises:
        RunDirectoryBusy: another live process holds it, named in the message.
    """
    directory = Path(output_dir).resolve()
    if directory in _held:
        return False
    directory.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(directory / LOCK_FILE))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise RunDirectoryBusy(busy_message(directory)) from None
    for other in list(_held):
        release(other)
    _held[directory] = lock
    files.write_json(directory / HOLDER_FILE, {
        "pid": os.getpid(), "host": socket.gethostname(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv)[:300]})
    return True


def release(output_dir: Path) -> None:
    """Give `output_dir` back (the end of a run); nothing happens if this process does not hold it."""
    directory = Path(output_dir).resolve()
    lock = _held.pop(directory, None)
    if lock is not None:
        (directory / HOLDER_FILE).unlink(missing_ok=True)
        lock.release(force=True)


def holds(output_dir: Path) -> bool:
    return Path(output_dir).resolve() in _held


def busy_message(directory: Path) -> str:
    try:
        holder = json.loads((directory / HOLDER_FILE).read_text())
        who = (f"process {holder['pid']} on {holder['host']}, started {holder['started']} "
               f"({holder['command']})")
    except (OSError, ValueError, KeyError):
        who = "a process that is just starting"
    return (f"output_dir={str(directory)!r} is in use by another run: {who}. Two runs in one folder "
            "would overwrite each other's checkpoints. Wait for it to end or stop it (a killed "
            "process frees the folder at once), or choose another output_dir.")
