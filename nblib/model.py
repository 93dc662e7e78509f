"""The model: transformers' GPT2LMHeadModel, so the result loads anywhere Hugging Face does."""
from __future__ import annotations

from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from .config import ModelConfig


def gpt2_config(cfg: ModelConfig, tokenizer: PreTrainedTokenizerFast) -> GPT2Config:
    """The GPT2Config for `cfg`; `vocab_size=None` takes the tokenizer's size."""
    vocab_size = cfg.vocab_size or len(tokenizer)
    if vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size={vocab_size}: smaller than the tokenizer's "
                         f"{len(tokenizer)} tokens; use None to take the tokenizer's size")
    return GPT2Config(
        vocab_size=vocab_size, n_positions=cfg.n_positions, n_embd=cfg.n_embd,
        n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=cfg.n_inner,
        resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
        bos_token_id=tokenizer.bos_token_id or tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def build(cfg: ModelConfig, tokenizer: PreTrainedTokenizerFast) -> GPT2LMHeadModel:
    """A freshly initialised GPT-2 (seed first: the weights come from torch's RNG)."""
    return GPT2LMHeadModel(gpt2_config(cfg, tokenizer))


def parameter_counts(model: GPT2LMHeadModel) -> dict[str, int]:
    """Total and non-embedding parameters (the tied lm_head is counted once)."""
    total = sum(p.numel() for p in model.parameters())
    embeddings = model.transformer.wte.weight.numel() + model.transformer.wpe.weight.numel()
    return {"total": total, "non_embedding": total - embeddings}


def describe(model: GPT2LMHeadModel) -> str:
    counts = parameter_counts(model)
    c = model.config
    return (f"GPT-2: {c.n_layer} layers, {c.n_head} heads, n_embd {c.n_embd}, context "
            f"{c.n_positions}, vocabulary {c.vocab_size:,}; {counts['total'] / 1e6:.2f}M "
            f"parameters, {counts['non_embedding'] / 1e6:.2f}M outside the embeddings")
