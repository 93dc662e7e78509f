"""What a person sees: information on stdout, warnings and errors on stderr, and an expected
refusal as its message alone.

Jupyter gives everything written to stderr the pink error background, so the run's log lines
(the data, the session clock, each evaluation) go to stdout and only warnings and errors to
stderr, in a notebook, under papermill's `--log-output` and from `python -m nblib.job` alike.

A `Refusal` is what the docs promise for a bad parameter, a GPU preset on a CPU, another run's
checkpoint, a busy folder or a bad data file: a message that names the parameter, file or line
and the fix. IPython shows an exception through its `_render_traceback_` where it has one, so a
refusal shows as that message, without nblib's frames; a real bug still shows its traceback.
"""
from __future__ import annotations

import logging
import sys
import time


class Refusal(Exception):
    """An expected stop with its fix in the message (not a bug: no traceback is shown)."""

    def _render_traceback_(self) -> list[str]:
        return [f"\x1b[1;31m{type(self).__name__}\x1b[0m: {str(self).splitlines()[0]}",
                *str(self).splitlines()[1:]]


class ConfigError(Refusal, ValueError):
    """A parameter value (or combination) the run cannot use."""


class DataError(Refusal, ValueError):
    """A data file, column or row the run cannot use."""


class DataFileMissing(Refusal, FileNotFoundError):
    """A data or evaluation file that is not where a parameter says."""


class Unsupported(Refusal, RuntimeError):
    """Hardware or a library build that cannot run what was asked (a GPU without kernels)."""


class Unreachable(Refusal, RuntimeError):
    """A dataset or tokenizer on the Hub that could not be reached or loaded."""


class NotEnoughSpace(Refusal, OSError):
    """A disk too full for what the run must write (errno ENOSPC; shown without "[Errno 28]")."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


class TrainingFailed(Refusal, RuntimeError):
    """Training stopped on a failure it cannot go past (a NaN streak, an OOM at micro-batch 1):
    the emergency checkpoint is saved and the message says what to change."""


class _Console(logging.Handler):
    """INFO and below to stdout, WARNING and above to stderr: looked up at each record, so a
    notebook's per-cell streams are the ones written to."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # logging's own rule: a failed record never stops the caller
            self.handleError(record)


def show_logs(level: int = logging.INFO) -> None:
    """Route the root logger's records through `_Console`, plain messages, replacing any handler
    a previous call (a re-run setup cell) left."""
    handler = _Console()
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("gguf").setLevel(logging.WARNING)  # the GGUF writer's own "Writing the following files"


def moment(seconds: float) -> str:
    """A clock time (time.time()) as '2026-11-30 01:23:14', local."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def time_of_day(seconds: float) -> str:
    """A clock time (time.time()) as '18:42', local."""
    return time.strftime("%H:%M", time.localtime(seconds))


def size(nbytes: float) -> str:
    """'512 B', '3.4 KB', '76.9 MB' or '1.20 GB': the unit that fits."""
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}" if unit == "GB" else f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes:.0f} B"
