"""What the string parameters name, checked against the disk, the Hub and the installed packages:
a tokenizer spec, a dataset spec, a pretrained model. The config calls these while validating."""
from __future__ import annotations

import glob
import json
import re
from pathlib import Path
from typing import Any, Mapping

BUILTIN_DATASETS = ("builtin:python-docs",)
GPT2_VOCAB_SIZE = 50257
GPT2_TOKENIZER = "openai-community/gpt2"  # the Hub's canonical id; "gpt2" is its legacy alias
GPT2_TOKENIZERS = (GPT2_TOKENIZER, "gpt2")
BPE_SPEC = re.compile(r"^bpe:(\d+)$")


def tokenizer_problems(spec: str, vocab_size: int | None, own_of_init_from: bool = False) -> list[str]:
    """A damaged tokenizer.json, an unknown spec, or a vocab_size below the tokenizer's (a
    pretrained model's own tokenizer is checked when it loads)."""
    damaged = _damaged(spec)
    if damaged or own_of_init_from:
        return damaged
    return _spec_problems(spec, vocab_size)


def pretrained_shape(v: dict[str, Any], explicit: Mapping[str, Any]) -> list[str]:
    """Put a pretrained model's shape, tokenizer and dropout into `v`; an explicitly given value
    that disagrees is a problem, not silently replaced."""
    from transformers import AutoConfig  # a local directory, or the Hub on Kaggle

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


def tokenizer_vocab_size(spec: str) -> int | None:
    """The vocabulary a tokenizer spec will have, when knowable without loading heavy data."""
    if spec in GPT2_TOKENIZERS:
        return GPT2_VOCAB_SIZE
    match = BPE_SPEC.match(spec)
    if match:
        return int(match.group(1))
    from transformers import AutoTokenizer  # local directory only: no network

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
    needed = tokenizer_vocab_size(spec)
    if vocab_size < needed:
        return [f"vocab_size={vocab_size!r}: smaller than the tokenizer's {needed} tokens "
                f"(tokenizer={spec!r}); use None to take the tokenizer's size"]
    return []


def is_local_dataset(spec: str) -> bool:
    """Local path or glob, as opposed to a Hub id such as 'Salesforce/wikitext'."""
    return (spec.startswith(("/", ".", "~")) or any(c in spec for c in "*?[")
            or spec.endswith((".txt", ".jsonl", ".json", ".parquet")) or Path(spec).exists())


def dataset_problems(spec: str) -> list[str]:
    if spec.startswith("builtin:") and spec not in BUILTIN_DATASETS:
        return [f"dataset={spec!r}: the built-in corpora are {', '.join(BUILTIN_DATASETS)}"]
    if spec.startswith("builtin:") or not is_local_dataset(spec):
        return []
    if not glob.glob(str(Path(spec).expanduser())):
        return [f"dataset={spec!r}: no such file, directory or glob match"]
    return []
