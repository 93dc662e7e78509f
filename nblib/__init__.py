"""nblib: the tested library behind the GPT-2 training notebook.

The notebook calls one module per step: config -> hardware -> data -> model -> launch ->
evaluation -> export -> generate -> plots. Modules load on first use (`nblib.data`), so
`python -m nblib.generate` and `python -m nblib.job` run without importing the rest.
"""
import importlib
from pathlib import Path

__all__ = sorted(p.stem for p in Path(__file__).parent.glob("*.py") if not p.stem.startswith("_"))


def __getattr__(name: str):
    if name in __all__:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'nblib' has no attribute {name!r}")
