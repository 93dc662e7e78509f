"""nblib: the tested library behind the GPT-2 training notebook.

Its folders follow the notebook's cells: setup/ (parameters, configuration, hardware, the run's
folder), data/, model/, training/, evaluation/, export/ (with generation and the upload), and
monitoring/ (progress, curves, reporters, MFU). `run` drives the cells in order; `job` and
`kaggle` are the command lines; `console` is what a person sees; `files` writes atomically.
Modules load on first use (`nblib.data`), so `python -m nblib.job` imports only what it needs.
"""
import importlib
from pathlib import Path

_HERE = Path(__file__).parent
__all__ = sorted([p.stem for p in _HERE.glob("*.py") if not p.stem.startswith("_")]
                 + [p.parent.name for p in _HERE.glob("*/__init__.py")])


def __getattr__(name: str):
    if name in __all__:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'nblib' has no attribute {name!r}")
