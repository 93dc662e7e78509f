"""nblib: the tested library behind the GPT-2 training notebook.

The notebook calls one module per step: config -> hardware -> data -> model -> train ->
export -> generate -> plots.
"""
from . import checkpoint, config, data, export, files, generate, hardware, model, plots, sources, state, train

__all__ = ["checkpoint", "config", "data", "export", "files", "generate", "hardware", "model",
           "plots", "sources", "state", "train"]
