"""Tokenize, pack and cache: text splits in, memory-mapped token blocks out."""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from nblib import files
from nblib.console import DataError, NotEnoughSpace
from nblib.data import bundle, chat, localfiles, pretokenized, sources
from nblib.data import tokenizer as tokenizers
from nblib.data.sources import is_local_dataset
from nblib.setup import paths
from nblib.setup.config import BPE_SPEC, DataConfig, RunConfig
from nblib.training.loss import IGNORE_INDEX

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when the cached format or the text rules change
ROWS_PER_PROCESS = 50_000  # below this, worker processes cost more than they save
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")
MASK_SUFFIX = ".mask"  # conversations: {split}.mask.bin, one uint8 per token
CHAT_FIELDS = ("data_format", "train_on", "instruction_column", "response_column")


@dataclass(frozen=True)
class Blocks:
    """Fixed-length windows over a flat token stream, gathered on indexing (nothing is copied
    until a batch is asked for)."""

    flat: np.ndarray  # the split's token stream (a memmap)
    starts: np.ndarray  # where each window begins
    size: int  # tokens per window: max_length + 1
    loss_mask: np.ndarray | None = None  # conversations: 1 where a token carries loss as a target

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index) -> np.ndarray:
        """(n, size) tokens for an index array or a slice; for conversations (n, 2, size): the
        tokens, and the labels (the tokens, IGNORE_INDEX where none is learnt)."""
        at = self.starts[index][..., None] + np.arange(self.size)
        if self.loss_mask is None:
            return self.flat[at]
        tokens = self.flat[at].astype(np.int64)
        return np.stack([tokens, np.where(self.loss_mask[at] == 1, tokens, IGNORE_INDEX)], axis=1)

    def counted_targets(self, index) -> int:
        """How many targets of these windows carry loss (loss.counted_targets of what indexing
        gives), reading the masks alone."""
        at = self.starts[index][..., None] + np.arange(1, self.size)
        return int(np.count_nonzero(self.loss_mask[at])) if self.loss_mask is not None else at.size


@dataclass
class Corpus:
    """Token streams of each split, memory-mapped, and the tokenizer that made them."""

    tokenizer: PreTrainedTokenizerFast
    cache_dir: Path
    tokens: dict[str, np.ndarray]  # split -> flat uint16/uint32 memmap
    max_length: int
    stride: int | None = None  # tokens between window starts; None: max_length + 1 (disjoint)
    drop_remainder: bool = True  # False: one last window ends at the stream's end
    digests: dict[str, str] = field(default_factory=dict)  # split -> sha256 of its token file
    loss_masks: dict[str, np.ndarray] = field(default_factory=dict)  # conversations: split -> uint8 memmap

    @property
    def is_chat(self) -> bool:
        """Conversations, formatted with the tokenizer's chat template."""
        return bool(self.loss_masks)

    @property
    def block_size(self) -> int:
        """Tokens per packed block: inputs plus the one-token-shifted targets."""
        return self.max_length + 1

    def blocks(self, split: str) -> Blocks:
        """The split's training windows of `max_length + 1` tokens."""
        flat, size = self.tokens[split], self.block_size
        stride = self.stride or size
        starts = np.arange(0, max(len(flat) - size + 1, 0), stride)
        if not self.drop_remainder and len(flat) >= size and starts[-1] + size < len(flat):
            starts = np.append(starts, len(flat) - size)
        return Blocks(flat, starts, size, self.loss_masks.get(split))

    def check_blocks(self, dataset: str) -> None:
        """Refuse a split too short for one block, before any training (an empty validation split
        would measure a loss of 0 and make its weights the best).

        Raises:
            ValueError: naming the split, the tokens it has and the tokens one block needs.
        """
        short = [f"the {split} split holds {len(tokens):,} tokens, fewer than the "
                 f"{self.block_size:,} one block needs (max_length + 1)"
                 for split, tokens in self.tokens.items() if len(self.blocks(split)) == 0]
        if short:
            raise DataError(f"dataset={dataset!r}: " + "; ".join(short) + ". Add text to it, lower "
                             "max_length, or (for a held-out file of your own) leave it out so that "
                             "5% of the training documents are held out instead")

    def check_answers(self, eval_blocks: int) -> None:
        """Conversations: the blocks every evaluation scores hold answer tokens; otherwise the
        first evaluation, after training began, would have no loss to measure.

        Raises:
            DataError: naming eval_blocks and max_length, and the fix.
        """
        validation = self.blocks("validation")
        scored = np.arange(min(eval_blocks, len(validation)))
        if self.is_chat and validation.counted_targets(scored) == 0:
            raise DataError(f"the {len(scored):,} validation blocks an evaluation scores (eval_blocks={eval_blocks}, "
                            f"max_length={self.max_length}) hold no answer token to measure a loss on: raise "
                            "eval_blocks, or use longer blocks or conversations with answers in the validation split")

    def describe(self) -> str:
        counts = ", ".join(f"{s} {len(t):,} tokens / {len(self.blocks(s)):,} blocks"
                           for s, t in self.tokens.items())
        learnt = ", ".join(f"{s} {int(m.sum()):,}" for s, m in self.loss_masks.items())
        learnt = f"; tokens that carry loss: {learnt}" if learnt else ""
        return f"{counts}{learnt}; vocabulary {len(self.tokenizer):,}; data in {self.cache_dir}"


def prepare(cfg: RunConfig) -> Corpus:
    """Load, tokenize and cache `cfg`'s dataset, or reopen the cache from an earlier run.

    The cache lives in `output_dir/data_cache/<key>`, keyed by everything that changes the
    tokens (source, files' sizes and mtimes, config, column, tokenizer), so a second run or a
    resume starts training without tokenizing again. The block length is applied on reading,
    so a different `max_length` reuses the same cache.
    """
    if bundle.is_bundle(cfg.data.dataset):
        bundle.verify(Path(cfg.data.dataset), cfg)
        log.info("using the prepared bundle %s: no tokenization", cfg.data.dataset)
        corpus = open_cache(Path(cfg.data.dataset), cfg)
    else:
        corpus = open_cache(_cached_or_built(cfg), cfg)
    corpus.check_blocks(cfg.data.dataset)
    corpus.check_answers(cfg.train.eval_blocks)
    return corpus


def _cached_or_built(cfg: RunConfig) -> Path:
    own = cfg.output_dir / "data_cache" / cache_key(cfg)
    files.remove_temporaries(own.parent)
    # An earlier Kaggle session's output, attached as input, brings its cache along (read-only).
    found = [d for d in [own, *paths.find_in_inputs(f"data_cache/{own.name}")] if files.is_complete(d)]
    if found:
        log.info("reusing tokenized data in %s", found[0])
        return found[0]
    localfiles.check_files(cfg.data)  # an empty or non-UTF-8 file is named before any heavy work
    if not _pretokenized_files(cfg):
        localfiles.check_records(cfg.data)
    try:
        return files.atomic_directory(own, lambda tmp: build_cache(cfg, tmp))
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        raise NotEnoughSpace(errno.ENOSPC, f"the disk of {own.parent} filled up while tokenizing dataset="
                             f"{cfg.data.dataset!r} ({shutil.disk_usage(own.parent).free / 2**20:,.0f} MB free now; "
                             "the partial cache was removed). Free some space (an older run's checkpoints or "
                             "data_cache), or set output_dir on a larger disk") from None


def cache_key(cfg: RunConfig) -> str:
    d = cfg.data
    identity = dict(version=CACHE_VERSION, source=sources.fingerprint(d), column=d.text_column,
                    tokenizer=d.tokenizer, seed=cfg.train.seed, token_key=d.token_key)
    conversations = {name: getattr(d, name) for name in CHAT_FIELDS}
    if conversations != {name: getattr(DataConfig, name) for name in CHAT_FIELDS}:
        identity["chat"] = conversations  # (left out at their defaults: text caches keep their keys)
    if Path(d.tokenizer).is_dir():  # a saved tokenizer: what its files hold, not its path
        identity["tokenizer"] = sorted((p.name, files.sha256(p)) for p in Path(d.tokenizer).iterdir()
                                       if p.name in TOKENIZER_FILES)
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return digest[:16]


def build_cache(cfg: RunConfig, directory: Path) -> None:
    """Write `{train,validation,test}.bin`, the tokenizer and `meta.json` into `directory`."""
    token_files = _pretokenized_files(cfg)
    if token_files and BPE_SPEC.match(cfg.data.tokenizer):
        raise DataError(f"tokenizer={cfg.data.tokenizer!r}: dataset={cfg.data.dataset!r} holds token "
                         "ids, so a BPE cannot be trained on it; pass the tokenizer that made the ids")
    splits = None if token_files else sources.load(cfg.data, cfg.train.seed)
    conversations = splits is not None and "messages" in splits["train"].column_names
    tokenizer = tokenizers.load(cfg.data.tokenizer, _text_batches(splits["train"]) if splits else ())
    dtype = np.uint16 if len(tokenizer) <= 2**16 else np.uint32
    if token_files:
        counts = pretokenized.write_splits(
            token_files, pretokenized.token_key_of(token_files[0], cfg.data.token_key),
            len(tokenizer), tokenizer.eos_token_id, cfg.train.seed, directory, dtype)
    else:
        if conversations:
            chat.ensure_template(tokenizer)
        counts = {name: write_tokens(_tokenized(split, name, tokenizer, cfg.data), directory, name, dtype)
                  for name, split in splits.items()}
    empty = [name for name, count in counts.items() if count == 0]
    if empty:
        raise DataError(f"dataset={cfg.data.dataset!r}: the {', '.join(empty)} split holds no tokens")
    tokenizer.save_pretrained(str(directory / "tokenizer"))
    written = [p.name.removesuffix(".bin") for p in sorted(directory.glob("*.bin"))]
    meta = dict(dtype=np.dtype(dtype).name, tokens=counts, vocab_size=len(tokenizer),
                format="chat" if conversations else "text",
                sha256={name: files.sha256(directory / f"{name}.bin") for name in written},
                eos_token_id=tokenizer.eos_token_id, key=cache_key(cfg),
                dataset=cfg.data.dataset, tokenizer=cfg.data.tokenizer)
    (directory / "meta.json").write_text(json.dumps(meta, indent=2))


def open_cache(cache_dir: Path, cfg: RunConfig) -> Corpus:
    """Memory-map a cache (or bundle) directory's token files, read-only."""
    meta = json.loads((cache_dir / "meta.json").read_text())
    tokens = {name: np.memmap(cache_dir / f"{name}.bin", dtype=meta["dtype"], mode="r")
              for name in meta["tokens"]}
    masks = {name: np.memmap(cache_dir / f"{name}{MASK_SUFFIX}.bin", dtype=np.uint8, mode="r")
             for name in tokens} if meta.get("format") == "chat" else {}
    tokenizer = AutoTokenizer.from_pretrained(str(cache_dir / "tokenizer"))
    digests = meta.get("sha256") or {name: files.sha256(cache_dir / f"{name}.bin") for name in tokens}
    return Corpus(tokenizer=tokenizer, cache_dir=cache_dir, tokens=tokens,
                  max_length=cfg.train.max_length, stride=cfg.data.stride,
                  drop_remainder=cfg.data.drop_remainder, digests=digests, loss_masks=masks)


def write_tokens(tokenized, directory: Path, split: str, dtype) -> int:
    """Stream the `input_ids` lists into `{split}.bin`, and conversations' `loss_mask` lists into
    `{split}.mask.bin` beside it; returns the token count."""
    count, chat_masks = 0, "loss_mask" in tokenized.column_names
    with open(directory / f"{split}.bin", "wb") as out, \
            open(directory / f"{split}{MASK_SUFFIX}.bin", "wb") if chat_masks else nullcontext() as masks:
        for table in tokenized.with_format("arrow").iter(batch_size=10_000):
            ids = pc.list_flatten(table["input_ids"]).to_numpy()
            out.write(ids.astype(dtype).tobytes())
            if chat_masks:
                masks.write(pc.list_flatten(table["loss_mask"]).to_numpy().astype(np.uint8).tobytes())
            count += len(ids)
    return count


def _tokenized(split, name: str, tokenizer: PreTrainedTokenizerFast, d: DataConfig):
    """The split's rows as `input_ids` lists (and `loss_mask` lists for conversations)."""
    if "messages" in split.column_names:
        function, kwargs = chat.tokenize, dict(train_on=d.train_on, where=f"dataset={d.dataset!r}, {name} split")
    else:
        function, kwargs = _tokenize, {}
    return split.map(function, batched=True, with_indices=function is chat.tokenize,
                     remove_columns=split.column_names, fn_kwargs={"tokenizer": tokenizer, **kwargs},
                     num_proc=_processes(len(split)), desc=f"tokenizing {name}")


def _tokenize(batch: dict, tokenizer: PreTrainedTokenizerFast) -> dict:
    # Blank rows add nothing; a document start gets the end-of-text token before it.
    eos = [tokenizer.eos_token_id]
    encoded = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
    ids = [eos + e if start else e
           for e, start, text in zip(encoded, batch["doc_start"], batch["text"]) if text.strip()]
    return {"input_ids": ids}


def _pretokenized_files(cfg: RunConfig) -> list[Path]:
    """The dataset's files when they are JSONL records of token ids; [] for text."""
    if not is_local_dataset(cfg.data.dataset):
        return []
    found = [p for p in sources.expand(cfg.data.dataset) if p.suffix in (".jsonl", ".json")]
    return found if found and pretokenized.token_key_of(found[0], cfg.data.token_key) else []


def _text_batches(split, batch_size: int = 1000):
    """The split's text, for training a BPE: a conversation's messages as one text."""
    for start in range(0, len(split), batch_size):
        rows = split[start:start + batch_size]
        yield rows["text"] if "text" in rows else [
            "\n".join(turn["content"] for turn in messages) for messages in rows["messages"]]


def _processes(rows: int) -> int | None:
    n = min(os.cpu_count() or 1, rows // ROWS_PER_PROCESS)
    return n if n > 1 else None
