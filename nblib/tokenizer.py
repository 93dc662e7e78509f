"""The tokenizer spec made real: the GPT-2 tokenizer, a byte-level BPE trained here, or a saved one."""
from __future__ import annotations

import logging
from typing import Iterable

from transformers import AutoTokenizer, PreTrainedTokenizerFast

from .specs import BPE_SPEC

log = logging.getLogger(__name__)

END_OF_TEXT = "<|endoftext|>"


def load(spec: str, training_texts: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """'openai-community/gpt2' (Hub), 'bpe:N' (trained on `training_texts`) or a saved tokenizer directory."""
    match = BPE_SPEC.match(spec)
    if match:
        return train_bpe(training_texts, int(match.group(1)))
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec)
    except OSError as error:
        raise RuntimeError(f"could not load tokenizer={spec!r}: on Kaggle turn Internet on for "
                           "Hub ids; offline use 'bpe:<vocab size>' or a saved directory") from error
    if not tokenizer.is_fast or tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer={spec!r}: need a fast tokenizer with an end-of-text "
                         f"(eos) token, got {type(tokenizer).__name__} eos={tokenizer.eos_token!r}")
    return tokenizer


def train_bpe(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a GPT-2-style byte-level BPE; `<|endoftext|>` is its only special token."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2,
                            special_tokens=[END_OF_TEXT], show_progress=False)
    log.info("trained a byte-level BPE with %d tokens", bpe.get_vocab_size())
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=END_OF_TEXT,
                                   eos_token=END_OF_TEXT, unk_token=END_OF_TEXT,
                                   model_max_length=1_000_000)

