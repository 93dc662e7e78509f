"""Pre-tokenized input: JSONL records that already hold token ids, one list per document."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from nblib.console import DataError
from nblib.data.sources import SPLITS, held_out, split_of

log = logging.getLogger(__name__)

TOKEN_KEYS = ("input_ids", "tokens")


def token_key_of(path: Path, wanted: str = "") -> str | None:
    """The key holding token ids in the file's first record, or None for a text file."""
    with open(path) as f:
        first = next((line for line in f if line.strip()), "")
    try:
        record = json.loads(first)
    except json.JSONDecodeError:
        return None
    keys = (wanted,) if wanted else TOKEN_KEYS
    return next((k for k in keys if isinstance(record, dict) and isinstance(record.get(k), list)), None)


def write_splits(files: list[Path], key: str, vocab_size: int, eos: int, seed: int,
                 directory: Path, dtype) -> dict[str, int]:
    """Stream the records into `{split}.bin`, an end-of-text token before each document.

    Files named after a split form it; otherwise records are held out 90/5/5, seeded.

    Raises:
        ValueError: an id outside the vocabulary, an empty list or a bad record, with file:line.
    """
    by_split: dict[str, list[Path]] = {}
    for path in files:
        by_split.setdefault(split_of(path), []).append(path)
    carve = set(SPLITS) - set(by_split)
    counts = {}
    outputs = {name: open(directory / f"{name}.bin", "wb") for name in SPLITS}
    try:
        for name, paths in by_split.items():
            assignment = None
            if name == "train" and carve:
                n_records = sum(1 for p in paths for line in open(p) if line.strip())
                assignment = held_out(n_records, [s for s in SPLITS if s in carve], seed)
            for i, ids in enumerate(_records(paths, key, vocab_size)):
                target = SPLITS[assignment[i]] if assignment is not None else name
                outputs[target].write(np.asarray([eos, *ids], dtype=dtype).tobytes())
    finally:
        for out in outputs.values():
            out.close()
    for name in SPLITS:
        counts[name] = (directory / f"{name}.bin").stat().st_size // np.dtype(dtype).itemsize
    return counts


def _records(paths: list[Path], key: str, vocab_size: int):
    for path in paths:
        with open(path) as f:
            for line_number, line in enumerate(f, 1):
                if line.strip():
                    yield _validated(line, key, vocab_size, f"{path}:{line_number}")


def _validated(line: str, key: str, vocab_size: int, where: str) -> list[int]:
    try:
        ids = json.loads(line)[key]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise DataError(f"{where}: expected a JSON object with a {key!r} list ({error})") from None
    if not isinstance(ids, list) or not ids:
        raise DataError(f"{where}: {key!r} must be a non-empty list of token ids")
    bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size]
    if bad:
        raise DataError(f"{where}: token id {bad[0]!r} is outside the tokenizer's vocabulary "
                         f"[0, {vocab_size})")
    return ids
