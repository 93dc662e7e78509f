"""The Model cell: transformers' GPT2LMHeadModel built from the configuration or a pretrained one
(`gpt2`), with optional LoRA adapters (`lora`). `model.build(cfg.model, tokenizer)` is the cell's call."""
from nblib.model.gpt2 import (
    build,
    checkpoint_weights,
    describe,
    fused_gelu,
    gpt2_config,
    load_weights,
    parameter_counts,
    unpadded,
    weights_are_finite,
)

__all__ = ["build", "checkpoint_weights", "describe", "fused_gelu", "gpt2_config", "load_weights",
           "parameter_counts", "unpadded", "weights_are_finite"]
