"""The model: transformers' GPT2LMHeadModel, so the result loads anywhere Hugging Face does.

Inside a run the vocabulary rows (the embedding and the tied lm_head) are padded to a multiple of
64, the width tensor-core matmuls want (nanoGPT's 50257 -> 50304). The padding never leaves the
run: checkpoints keep it apart from `model_state_dict`, which holds the tokenizer-sized model the
guide's load snippet builds, and the export drops it.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from transformers import AutoConfig, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

from nblib.console import ConfigError
from nblib.model import lora
from nblib.setup.config import SCRATCH, ModelConfig

VOCAB_MULTIPLE = 64
VOCAB_KEYS = ("transformer.wte.weight", "lm_head.weight")  # tied: one tensor, two names


def gpt2_config(cfg: ModelConfig, tokenizer: PreTrainedTokenizerFast) -> GPT2Config:
    """The GPT2Config for `cfg`: `vocab_size=None` takes the tokenizer's size, and the model's
    rows are that size padded to a multiple of VOCAB_MULTIPLE (`unpadded_vocab_size` keeps it)."""
    vocab_size = cfg.vocab_size or len(tokenizer)
    if vocab_size < len(tokenizer):
        raise ConfigError(f"vocab_size={vocab_size}: smaller than the tokenizer's "
                         f"{len(tokenizer)} tokens; use None to take the tokenizer's size")
    return GPT2Config(
        vocab_size=-(-vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE,
        unpadded_vocab_size=vocab_size, n_positions=cfg.n_positions, n_embd=cfg.n_embd,
        n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=cfg.n_inner,
        resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
        bos_token_id=tokenizer.bos_token_id or tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def build(cfg: ModelConfig, tokenizer: PreTrainedTokenizerFast) -> GPT2LMHeadModel:
    """A freshly initialised GPT-2 (seed first: the weights come from torch's RNG), or the
    pretrained one `init_from` names, with LoRA adapters when `lora_r` > 0."""
    if cfg.init_from == SCRATCH:
        return fused_gelu(GPT2LMHeadModel(gpt2_config(cfg, tokenizer)))
    model = GPT2LMHeadModel.from_pretrained(cfg.init_from, resid_pdrop=cfg.dropout,
                                            embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout).float()
    if len(tokenizer) > model.config.vocab_size:
        raise ConfigError(f"init_from={cfg.init_from!r}: its tokenizer has {len(tokenizer)} tokens, "
                         f"its model {model.config.vocab_size} rows")
    model = fused_gelu(model)
    return lora.wrap(model, cfg) if cfg.lora_r else model


def fused_gelu(model: GPT2LMHeadModel) -> GPT2LMHeadModel:
    """GPT-2's activation, "gelu_new", is the tanh GELU written as six Python-level tensor ops,
    each keeping its input for the backward pass; torch's one kernel computes the same function
    (to rounding) faster and keeps one. Only the module changes: the config, the weights and
    every export stay GPT-2's."""
    if model.config.activation_function == "gelu_new":
        for module in model.modules():
            if isinstance(module, GPT2MLP):
                module.act = torch.nn.GELU(approximate="tanh")
    return model


def unpadded_vocab_size(model: GPT2LMHeadModel) -> int:
    return getattr(model.config, "unpadded_vocab_size", model.config.vocab_size)


def split_padding(weights: dict[str, torch.Tensor], vocab_size: int) -> tuple[dict, dict]:
    """(weights with `vocab_size` vocabulary rows, the padding rows by key): views, no copies."""
    plain, padding = dict(weights), {}
    for key in VOCAB_KEYS:
        if key in plain and plain[key].shape[0] > vocab_size:
            plain[key], padding[key] = plain[key][:vocab_size], plain[key][vocab_size:]
    return plain, padding


def checkpoint_weights(model: GPT2LMHeadModel) -> dict[str, dict[str, torch.Tensor]]:
    """`model_state_dict` (tokenizer-sized) and `vocab_padding` for a checkpoint."""
    weights, padding = split_padding(model.state_dict(), unpadded_vocab_size(model))
    return {"model_state_dict": weights, "vocab_padding": padding}


def load_weights(model: GPT2LMHeadModel, saved: dict) -> None:
    """Load a checkpoint's weights (padding rows put back; `_orig_mod.` prefixes stripped)."""
    padding = saved.get("vocab_padding") or {}
    weights = {key.removeprefix("_orig_mod."): value for key, value in saved["model_state_dict"].items()}
    model.load_state_dict({key: torch.cat([value, padding[key].to(value.device)]) if key in padding
                           else value for key, value in weights.items()})


def unpadded(model: GPT2LMHeadModel) -> GPT2LMHeadModel:
    """`model` itself when it has no padding rows, else a CPU copy without them."""
    vocab_size = unpadded_vocab_size(model)
    if vocab_size == model.config.vocab_size:
        return model
    config = copy.deepcopy(model.config)
    config.vocab_size = vocab_size
    del config.unpadded_vocab_size
    plain = GPT2LMHeadModel(config)
    plain.load_state_dict(split_padding(model.state_dict(), vocab_size)[0])
    return plain


def parameter_counts(model: GPT2LMHeadModel) -> dict[str, int]:
    """Total and non-embedding parameters of the exported model: the tied lm_head is counted once
    and the padding rows not at all."""
    padding_rows = model.config.vocab_size - unpadded_vocab_size(model)
    total = sum(p.numel() for p in model.parameters()) - padding_rows * model.config.n_embd
    embeddings = (model.transformer.wte.weight.numel() - padding_rows * model.config.n_embd
                  + model.transformer.wpe.weight.numel())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if model.transformer.wte.weight.requires_grad:
        trainable -= padding_rows * model.config.n_embd
    return {"total": total, "non_embedding": total - embeddings, "trainable": trainable}


def describe(model: GPT2LMHeadModel) -> str:
    counts = parameter_counts(model)
    c = model.config
    vocabulary = f"{unpadded_vocab_size(model):,}"
    if c.vocab_size != unpadded_vocab_size(model):
        vocabulary += f" (padded to {c.vocab_size:,} for the matmuls)"
    text = (f"GPT-2: {c.n_layer} layers, {c.n_head} heads, n_embd {c.n_embd}, context "
            f"{c.n_positions}, vocabulary {vocabulary}; {counts['total'] / 1e6:.2f}M "
            f"parameters, {counts['non_embedding'] / 1e6:.2f}M outside the embeddings")
    if counts["trainable"] != counts["total"]:
        text += (f"; trainable: {counts['trainable']:,} ({100 * counts['trainable'] / counts['total']:.2f}%, "
                 "the LoRA adapters)")
    return text


def weights_are_finite(model: torch.nn.Module) -> bool:
    return all(torch.isfinite(p).all() for p in model.parameters())


def pretrained_shape(v: dict[str, Any], explicit: Mapping[str, Any]) -> list[str]:
    """Put a pretrained model's shape, tokenizer and dropout into `v`; an explicitly given value
    that disagrees is a problem, not silently replaced."""
    source = v["init_from"]
    try:
        pretrained = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as error:
        return [f"init_from={source!r}: not a Hugging Face model directory or a reachable Hub id "
                f"({str(error).splitlines()[0]}); on Kaggle turn Internet on for Hub ids"]
    if pretrained.model_type != "gpt2":
        return [f"init_from={source!r}: a {pretrained.model_type} model; this notebook trains GPT-2 "
                "models (openai-community/gpt2, distilbert/distilgpt2 or one saved by a previous run)"]
    shape = dict(vocab_size=pretrained.vocab_size, n_positions=pretrained.n_positions,
                 n_embd=pretrained.n_embd, n_layer=pretrained.n_layer, n_head=pretrained.n_head,
                 n_inner=pretrained.n_inner or 4 * pretrained.n_embd, tokenizer=source)
    problems = [f"{k}={explicit[k]!r}: init_from={source!r} has {k}={shape[k]!r}; leave it None"
                for k in shape if k in explicit and explicit[k] != shape[k]]
    v.update(shape)
    if "dropout" not in explicit:
        v["dropout"] = pretrained.resid_pdrop
    return problems
