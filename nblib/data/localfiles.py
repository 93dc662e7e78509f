"""Local data files checked before `datasets` reads them: its own errors name neither the file
nor the fix."""
from __future__ import annotations

import codecs
import itertools
import json
from pathlib import Path

from nblib.console import DataError
from nblib.data import chat
from nblib.data.sources import expand, is_chat, is_local_dataset
from nblib.setup.config import DataConfig


def check_files(cfg: DataConfig) -> None:
    """Name an empty or non-UTF-8 local file.

    Raises:
        ValueError: naming the file, the byte offset and what to do.
    """
    for path in _local_files(cfg):
        if path.suffix in (".txt", ".jsonl", ".json"):  # parquet is binary and typed
            _check_text(path, cfg.dataset)


def check_records(cfg: DataConfig, lines: int = 1000) -> None:
    """Each JSON-lines file's records, before anything reads them (a tokenizer trains on them
    first): a record of text holds a string (or nothing) under the text column, in its first
    `lines` lines; a conversation (a `messages` list, or the instruction and response columns)
    is checked on every line, so its file's line is named.

    Raises:
        console.DataError: naming the file and line, and the fix.
    """
    for path in _local_files(cfg):
        if path.suffix != ".jsonl":
            continue
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                record = _record(line, f"dataset={cfg.dataset!r}: {path}:{number}")
                if is_chat(list(record), cfg):
                    _check_conversation(record, cfg, f"dataset={cfg.dataset!r}: {path}:{number}")
                elif number <= lines:
                    _check_text_record(record, cfg, f"{path}:{number}")


def _record(line: str, where: str) -> dict:
    try:
        record = json.loads(line)
    except ValueError:
        record = None
    if not isinstance(record, dict):
        raise DataError(f"{where} is not a JSON object on one line (JSON lines: one object per line)")
    return record


def _check_conversation(record: dict, cfg: DataConfig, where: str) -> None:
    if "messages" in record:
        chat.checked(record["messages"], where)
        return
    for column in (cfg.instruction_column, cfg.response_column):
        if not isinstance(record.get(column), str):
            raise DataError(f"{where}: {column!r} holds {type(record.get(column)).__name__} "
                            f"{str(record.get(column))[:40]!r}, not text; give every line a text "
                            f"{column!r}, or remove the line")


def _check_text_record(record: dict, cfg: DataConfig, where: str) -> None:
    value = record.get(cfg.text_column, "")
    if value is None:
        raise DataError(f"dataset={cfg.dataset!r}: {where} has null for {cfg.text_column!r}; give the "
                        "record text or remove it")
    if not isinstance(value, str):
        raise DataError(f"text_column={cfg.text_column!r}: {where} holds {type(value).__name__} "
                        f"{repr(value)[:40]} there, not text; name the column that holds the text with text_column")


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
                raise DataError(
                    f"dataset={spec!r}: {path} is not UTF-8 text: the byte {error.object[error.start]:#04x} "
                    f"at offset {offset - buffered + error.start:,} cannot be decoded ({error.reason}). "
                    f"Convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8 {path.name} > "
                    f"{path.stem}.utf8{path.suffix})") from None
            blank = blank and not text.strip()
            offset += len(chunk)
    if blank:
        raise DataError(f"dataset={spec!r}: {path} is empty ({offset} bytes, no text); fill it, or "
                         "remove it from the dataset's files")
