"""Tokenize, pack and cache: text splits in, memory-mapped token blocks out."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from . import files, paths, sources, tokenizer as tokenizers
from .config import RunConfig

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when the cached format or the text rules change
ROWS_PER_PROCESS = 50_000  # below this, worker processes cost more than they save


@dataclass
class Corpus:
    """Token streams of each split, memory-mapped, and the tokenizer that made them."""

    tokenizer: PreTrainedTokenizerFast
    cache_dir: Path
    tokens: dict[str, np.ndarray]  # split -> flat uint16/uint32 memmap
    max_length: int

    @property
    def block_size(self) -> int:
        """Tokens per packed block: inputs plus the one-token-shifted targets."""
        return self.max_length + 1

    def blocks(self, split: str) -> np.ndarray:
        """(n_blocks, max_length + 1) view of a split; the remainder is dropped."""
        flat = self.tokens[split]
        n = len(flat) // self.block_size
        return flat[: n * self.block_size].reshape(n, self.block_size)

    def describe(self) -> str:
        counts = ", ".join(f"{s} {len(t):,} tokens / {len(self.blocks(s)):,} blocks"
                           for s, t in self.tokens.items())
        return f"{counts}; vocabulary {len(self.tokenizer):,}; cache {self.cache_dir}"


def prepare(cfg: RunConfig) -> Corpus:
    """Load, tokenize and cache `cfg`'s dataset, or reopen the cache from an earlier run.

    The cache lives in `output_dir/data_cache/<key>`, keyed by everything that changes the
    tokens (source, files' sizes and mtimes, config, column, tokenizer), so a second run or a
    resume starts training without tokenizing again. The block length is applied on reading,
    so a different `max_length` reuses the same cache.
    """
    own = cfg.output_dir / "data_cache" / cache_key(cfg)
    files.remove_temporaries(own.parent)
    # An earlier Kaggle session's output, attached as input, brings its cache along (read-only).
    found = [d for d in [own, *paths.find_in_inputs(f"data_cache/{own.name}")] if files.is_complete(d)]
    if found:
        log.info("reusing tokenized data in %s", found[0])
        return open_cache(found[0], cfg.train.max_length)
    files.atomic_directory(own, lambda tmp: build_cache(cfg, tmp))
    return open_cache(own, cfg.train.max_length)


def cache_key(cfg: RunConfig) -> str:
    d = cfg.data
    identity = dict(version=CACHE_VERSION, source=sources.fingerprint(d), column=d.text_column,
                    tokenizer=d.tokenizer, seed=cfg.train.seed)
    if Path(d.tokenizer).is_dir():
        identity["tokenizer"] = hashlib.sha256(
            (Path(d.tokenizer) / "tokenizer.json").read_bytes()).hexdigest()
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return digest[:16]


def build_cache(cfg: RunConfig, directory: Path) -> None:
    """Write `{train,validation,test}.bin`, the tokenizer and `meta.json` into `directory`."""
    splits = sources.load(cfg.data, cfg.train.seed)
    tokenizer = tokenizers.load(cfg.data.tokenizer, _text_batches(splits["train"]))
    tokenizer.save_pretrained(str(directory / "tokenizer"))
    dtype = np.uint16 if len(tokenizer) <= 2**16 else np.uint32
    counts = {}
    for name, split in splits.items():
        tokenized = split.map(
            _tokenize, batched=True, remove_columns=split.column_names,
            fn_kwargs={"tokenizer": tokenizer}, num_proc=_processes(len(split)),
            desc=f"tokenizing {name}")
        counts[name] = write_tokens(tokenized, directory / f"{name}.bin", dtype)
        if counts[name] == 0:
            raise ValueError(f"dataset={cfg.data.dataset!r}: the {name} split holds no text")
    meta = dict(dtype=np.dtype(dtype).name, tokens=counts, vocab_size=len(tokenizer),
                eos_token_id=tokenizer.eos_token_id, key=cache_key(cfg),
                dataset=cfg.data.dataset, tokenizer=cfg.data.tokenizer)
    (directory / "meta.json").write_text(json.dumps(meta, indent=2))


def open_cache(cache_dir: Path, max_length: int) -> Corpus:
    meta = json.loads((cache_dir / "meta.json").read_text())
    tokens = {name: np.memmap(cache_dir / f"{name}.bin", dtype=meta["dtype"], mode="r")
              for name in meta["tokens"]}
    tokenizer = AutoTokenizer.from_pretrained(str(cache_dir / "tokenizer"))
    return Corpus(tokenizer=tokenizer, cache_dir=cache_dir, tokens=tokens, max_length=max_length)


def write_tokens(tokenized, path: Path, dtype) -> int:
    """Stream the `input_ids` lists into one flat binary file; returns the token count."""
    count = 0
    with open(path, "wb") as out:
        for table in tokenized.with_format("arrow").iter(batch_size=10_000):
            ids = pc.list_flatten(table["input_ids"]).to_numpy()
            out.write(ids.astype(dtype).tobytes())
            count += len(ids)
    return count


def _tokenize(batch: dict, tokenizer: PreTrainedTokenizerFast) -> dict:
    # Blank rows add nothing; a document start gets the end-of-text token before it.
    eos = [tokenizer.eos_token_id]
    encoded = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
    ids = [eos + e if start else e
           for e, start, text in zip(encoded, batch["doc_start"], batch["text"]) if text.strip()]
    return {"input_ids": ids}


def _text_batches(split, batch_size: int = 1000):
    for start in range(0, len(split), batch_size):
        yield split[start:start + batch_size]["text"]


def _processes(rows: int) -> int | None:
    n = min(os.cpu_count() or 1, rows // ROWS_PER_PROCESS)
    return n if n > 1 else None
