"""Local data files checked before `datasets` reads them: its own errors name neither the file
nor the fix."""
from __future__ import annotations

import codecs
import itertools
import json
from pathlib import Path

from .config import DataConfig
from .sources import expand, is_chat, is_local_dataset


def check_files(cfg: DataConfig) -> None:
    """Name an empty or non-UTF-8 local file.

    Raises:
        ValueError: naming the file, the byte offset and what to do.
    """
    for path in _local_files(cfg):
        if path.suffix in (".txt", ".jsonl", ".json"):  # parquet is binary and typed
            _check_text(path, cfg.dataset)


def check_records(cfg: DataConfig, lines: int = 1000) -> None:
    """The first `lines` records of each JSON-lines file of text hold a string (or nothing) under
    the text column; the loaded column's type is checked too. Conversations are checked as they
    are tokenized (chat.checked).

    Raises:
        ValueError: naming the file and line.
    """
    for path in _local_files(cfg):
        if path.suffix != ".jsonl" or cfg.data_format == "chat":
            continue
        with open(path, encoding="utf-8") as f:
            for number, line in zip(range(1, lines + 1), f):
                try:
                    record = json.loads(line) if line.strip() else {}
                    value = record.get(cfg.text_column, "")
                except (ValueError, AttributeError):
                    raise ValueError(f"dataset={cfg.dataset!r}: {path}:{number} is not a JSON object on "
                                     "one line (JSON lines: one object per line)") from None
                if is_chat(list(record), cfg):
                    break
                if value is None:
                    raise ValueError(f"dataset={cfg.dataset!r}: {path}:{number} has null for "
                                     f"{cfg.text_column!r}; give the record text or remove it")
                if not isinstance(value, str):
                    raise ValueError(f"text_column={cfg.text_column!r}: {path}:{number} holds "
                                     f"{type(value).__name__} {repr(value)[:40]} there, not text; "
                                     "name the column that holds the text with text_column")


def _local_files(cfg: DataConfig) -> list[Path]:
    if cfg.dataset.startswith("builtin:") or not is_local_dataset(cfg.dataset):
        return []
    return expand(cfg.dataset)


def _check_text(path: Path, spec: str) -> None:
    decoder, offset, blank = codecs.getincrementaldecoder("utf-8")(), 0, True
    with open(path, "rb") as f:
        for chunk in itertools.chain(iter(lambda: f.read(1 << 20), b""), [b""]):  # b"": the end
            buffered = len(decoder.getstate()[0])  # an unfinished character from the last chunk
            try:
                text = decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as error:
                raise ValueError(
                    f"dataset={spec!r}: {path} is not UTF-8 text: the byte {error.object[error.start]:#04x} "
                    f"at offset {offset - buffered + error.start:,} cannot be decoded ({error.reason}). "
                    f"Convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8 {path.name} > "
                    f"{path.stem}.utf8{path.suffix})") from None
            blank = blank and not text.strip()
            offset += len(chunk)
    if blank:
        raise ValueError(f"dataset={spec!r}: {path} is empty ({offset} bytes, no text); fill it, or "
                         "remove it from the dataset's files")
