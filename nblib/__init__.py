"""nblib: the tested library behind the GPT-2 training notebook.

The notebook calls one module per step: config -> hardware -> data -> model -> train ->
export -> generate -> plots. Modules load on first use (`nblib.data`), so `python -m
nblib.generate` and `python -m nblib.job` run without importing the rest.
"""
import importlib

__all__ = ["checkpoint", "config", "contract", "data", "distributed", "export", "files", "generate", "hardware", "job",
           "launch", "lock", "lora", "memory", "model", "paths", "plots", "progress", "report", "sources", "specs", "state", "step", "stopping", "tokenizer", "train"]


def __getattr__(name: str):
    if name in __all__:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'nblib' has no attribute {name!r}")
