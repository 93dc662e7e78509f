"""The tokenizer spec made real: the GPT-2 tokenizer, a byte-level BPE trained here, or a saved one."""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from nblib.console import ConfigError, Unreachable
from nblib.setup.config import BPE_SPEC, GPT2_TOKENIZER, GPT2_TOKENIZERS, GPT2_VOCAB_SIZE

if TYPE_CHECKING:  # transformers itself loads with the first tokenizer, not with the spec checks
    from transformers import PreTrainedTokenizerFast

log = logging.getLogger(__name__)

END_OF_TEXT = "<|endoftext|>"


def load(spec: str, training_texts: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """'openai-community/gpt2' (Hub), 'bpe:N' (trained on `training_texts`) or a saved tokenizer directory."""
    match = BPE_SPEC.match(spec)
    if match:
        return train_bpe(training_texts, int(match.group(1)))
    try:
        from transformers import AutoTokenizer  # transformers loads when a tokenizer does

        tokenizer = AutoTokenizer.from_pretrained(spec)
    except OSError as error:
        raise Unreachable(f"could not load tokenizer={spec!r}: on Kaggle turn Internet on for "
                           "Hub ids; offline use 'bpe:<vocab size>' or a saved directory") from error
    if not tokenizer.is_fast or tokenizer.eos_token_id is None:
        raise ConfigError(f"tokenizer={spec!r}: need a fast tokenizer with an end-of-text "
                         f"(eos) token, got {type(tokenizer).__name__} eos={tokenizer.eos_token!r}")
    return tokenizer


def train_bpe(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a GPT-2-style byte-level BPE; `<|endoftext|>` is its only special token."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    log.info("training a byte-level BPE of %s tokens on the training split: the bar counts the text "
             "read; the merges after it take about as long again", f"{vocab_size:,}")
    started = time.perf_counter()
    read = tqdm(texts, desc="BPE: reading", unit=" texts", mininterval=2.0)
    bpe.train_from_iterator(read, vocab_size=vocab_size, min_frequency=2, special_tokens=[END_OF_TEXT],
                            show_progress=False)
    read.close()
    log.info("trained a byte-level BPE with %d tokens in %.0f s", bpe.get_vocab_size(), time.perf_counter() - started)
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=END_OF_TEXT,
                                   eos_token=END_OF_TEXT, unk_token=END_OF_TEXT,
                                   model_max_length=1_000_000)


def spec_problems(spec: str, vocab_size: int | None, own_of_init_from: bool = False) -> list[str]:
    """A damaged tokenizer.json, an unknown spec, or a vocab_size below the tokenizer's (a
    pretrained model's own tokenizer is checked when it loads)."""
    damaged = _damaged(spec)
    if damaged or own_of_init_from:
        return damaged
    return _spec_problems(spec, vocab_size)


def vocab_size_of(spec: str) -> int | None:
    """The vocabulary a tokenizer spec will have, when knowable without loading heavy data."""
    if spec in GPT2_TOKENIZERS:
        return GPT2_VOCAB_SIZE
    match = BPE_SPEC.match(spec)
    if match:
        return int(match.group(1))
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(spec))


def _damaged(spec: str) -> list[str]:
    """A saved tokenizer whose tokenizer.json does not parse (a truncated upload or copy)."""
    path = Path(spec) / "tokenizer.json"
    if not path.is_file():
        return []
    try:
        json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as error:
        return [f"tokenizer={spec!r}: {path} is damaged or truncated ({error}); save the tokenizer "
                "again with tokenizer.save_pretrained, or use 'bpe:<vocab size>'"]
    return []


def _spec_problems(spec: str, vocab_size: int | None) -> list[str]:
    match = BPE_SPEC.match(spec)
    if match and not 260 <= int(match.group(1)) <= 1_000_000:
        return [f"tokenizer={spec!r}: bpe vocabulary must be between 260 and 1000000"]
    if not match and spec not in GPT2_TOKENIZERS and not (Path(spec) / "tokenizer_config.json").is_file():
        return [f"tokenizer={spec!r}: must be '{GPT2_TOKENIZER}', 'bpe:<vocab size>' (e.g. 'bpe:8192') "
                "or a directory saved with tokenizer.save_pretrained"]
    if vocab_size is None:
        return []
    if vocab_size <= 0:
        return [f"vocab_size={vocab_size!r}: must be > 0"]
    needed = vocab_size_of(spec)
    if vocab_size < needed:
        return [f"vocab_size={vocab_size!r}: smaller than the tokenizer's {needed} tokens "
                f"(tokenizer={spec!r}); use None to take the tokenizer's size"]
    return []
