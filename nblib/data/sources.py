"""Raw text in: every supported dataset source becomes train/validation/test splits of text rows."""
from __future__ import annotations

import ast
import glob
import hashlib
import logging
import re
import sys
import sysconfig
from pathlib import Path

import datasets
import numpy as np

from nblib.console import DataError, Unreachable
from nblib.data import chat
from nblib.setup.config import BUILTIN_DATASETS, DataConfig

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
SPLIT_ALIASES = {"train": "train", "validation": "validation", "valid": "validation",
                 "val": "validation", "dev": "validation", "test": "test",
                 "train_sft": "train", "test_sft": "test"}  # chat datasets' names (UltraChat's)
LOADERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
HELD_OUT_SHARE = 0.05  # validation and test each, when the source has no such split
# A WikiText article title (" = Title = "), not a section (" = = Section = = ").
WIKITEXT_TITLE = re.compile(r"^ = [^=].* = \n?$")


def load(cfg: DataConfig, seed: int) -> datasets.DatasetDict:
    """Load `cfg.dataset` as train/validation/test with a `text` (or, for conversations, a
    `messages`) column and a `doc_start` column.

    `doc_start` marks rows that begin a document (a WikiText article, a paragraph of a text
    file, or every row of a record-per-document source); the tokenizer's end-of-text token
    goes there. Splits the source lacks are carved from train, seeded, by whole document.
    """
    raw = _load_raw(cfg)
    if "messages" in raw["train"].column_names:  # conversations: every row is a document
        log.info("dataset %s: conversations, splits %s", cfg.dataset, list(raw))
        return _complete_splits(datasets.DatasetDict({
            name: split.add_column("doc_start", [True] * len(split)) for name, split in raw.items()}), seed)
    layout = detect_layout(raw["train"][:2000]["text"], line_based=_is_text_files(cfg.dataset))
    log.info("dataset %s: %s layout, splits %s", cfg.dataset, layout, list(raw))
    marked = datasets.DatasetDict({
        name: split.map(_mark_documents, batched=True, fn_kwargs={"layout": layout},
                        desc=f"finding {name} documents")
        for name, split in raw.items()})
    return _complete_splits(marked, seed)


def fingerprint(cfg: DataConfig) -> dict:
    """What identifies the source's content, for the token cache's key."""
    if cfg.dataset.startswith("builtin:"):
        return {"builtin": cfg.dataset, "python": sys.version, "stdlib": sysconfig.get_paths()["stdlib"]}
    if not is_local_dataset(cfg.dataset):
        return {"hub": cfg.dataset, "config": cfg.dataset_config}
    files = sorted(p for p in expand(cfg.dataset) if p.is_file())
    stats = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return {"local": cfg.dataset, "files": hashlib.sha256(repr(stats).encode()).hexdigest()}


def detect_layout(sample: list[str], line_based: bool) -> str:
    """'wikitext' (title lines), 'lines' (paragraphs of a text file) or 'documents'."""
    if any(WIKITEXT_TITLE.match(row) for row in sample):
        return "wikitext"
    return "lines" if line_based else "documents"


def _mark_documents(batch: dict, layout: str) -> dict:
    texts = batch["text"]
    if layout == "wikitext":
        starts = [bool(WIKITEXT_TITLE.match(t)) for t in texts]
    elif layout == "lines":
        # A paragraph starts at a non-blank line after a blank one. A batch boundary may
        # start an extra paragraph: harmless, it only adds one end-of-text token.
        previous = [""] + texts[:-1]
        starts = [bool(t.strip()) and not p.strip() for t, p in zip(texts, previous)]
    else:
        starts = [True] * len(texts)
    if layout != "documents":  # line-per-row sources lose their newlines on loading
        texts = [t if t.endswith("\n") else t + "\n" for t in texts]
    return {"text": texts, "doc_start": starts}


def _complete_splits(dsd: datasets.DatasetDict, seed: int) -> datasets.DatasetDict:
    missing = [s for s in SPLITS if s not in dsd]
    if not missing:
        return dsd
    train = dsd["train"]
    starts = train.select_columns(["doc_start"]).with_format("numpy")[:]["doc_start"]
    doc_ids = np.maximum(np.cumsum(np.asarray(starts, dtype=bool)) - 1, 0)
    n_docs = int(doc_ids[-1]) + 1 if len(doc_ids) else 0  # rows before the first start join doc 0
    if n_docs < 3:
        raise DataError(f"the dataset has {n_docs} document(s) and no {'/'.join(missing)} "
                         "split: at least 3 documents are needed to hold some out")
    row_split = held_out(n_docs, missing, seed)[doc_ids]
    out = {name: dsd[name] for name in SPLITS if name in dsd}
    for name in ["train", *missing]:
        out[name] = train.select(np.flatnonzero(row_split == SPLITS.index(name)))
    log.info("held out %s from train's %d documents", missing, n_docs)
    return datasets.DatasetDict({name: out[name] for name in SPLITS})


def held_out(n_documents: int, missing: list[str], seed: int) -> np.ndarray:
    """Each document's split, as an index into SPLITS: the missing splits get 5% each, seeded."""
    assignment = np.zeros(n_documents, dtype=np.int8)
    order = np.random.default_rng(seed).permutation(n_documents)
    n_held = max(1, int(n_documents * HELD_OUT_SHARE))
    for i, name in enumerate(missing):
        assignment[order[i * n_held:(i + 1) * n_held]] = SPLITS.index(name)
    return assignment


def _load_raw(cfg: DataConfig) -> datasets.DatasetDict:
    if cfg.dataset.startswith("builtin:"):
        dsd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": python_docs()})})
    elif not is_local_dataset(cfg.dataset):
        dsd = _load_hub(cfg)
    elif (Path(cfg.dataset) / "dataset_dict.json").is_file() or (Path(cfg.dataset) / "dataset_info.json").is_file():
        dsd = datasets.load_from_disk(cfg.dataset)
    else:
        dsd = _load_files(cfg.dataset)
    if isinstance(dsd, datasets.Dataset):
        dsd = datasets.DatasetDict({"train": dsd})
    return _normalise(dsd, cfg)


def _load_hub(cfg: DataConfig) -> datasets.DatasetDict:
    try:
        return datasets.load_dataset(cfg.dataset, cfg.dataset_config or None)
    except ValueError as error:
        if "BuilderConfig" not in str(error):
            raise
        raise DataError(  # the Hub answered: the dataset has no such configuration
            f"dataset_config={cfg.dataset_config!r}: not a configuration of dataset={cfg.dataset!r} "
            f"({str(error).splitlines()[0]}); set dataset_config to one of those, or \"\" for "
            "none") from error
    except Exception as error:  # the Hub raises many types; re-raise with the fix attached
        raise Unreachable(
            f"could not load dataset={cfg.dataset!r} (config {cfg.dataset_config!r}) from the "
            "Hugging Face Hub. On Kaggle, turn Internet on in the notebook's settings; offline, "
            "pass a local path or 'builtin:python-docs'.") from error


def expand(spec: str) -> list[Path]:
    """The data files a local dataset spec (a file, a directory or a glob) names."""
    matches = [Path(p) for p in sorted(glob.glob(str(Path(spec).expanduser())))]
    files = []
    for match in matches:
        files += sorted(p for p in match.rglob("*") if p.suffix in LOADERS) if match.is_dir() else [match]
    return files


def split_of(path: Path) -> str:
    """Files named after a split (wiki.valid.txt, test.parquet) form that split; others train."""
    words = re.split(r"[._\-]", Path(path).stem)
    return next((SPLIT_ALIASES[w] for w in words if w in SPLIT_ALIASES), "train")


def _is_text_files(spec: str) -> bool:
    """Local .txt files only: the `text` loader gives one row per line."""
    if spec.startswith("builtin:") or not is_local_dataset(spec):
        return False
    found = expand(spec)
    return bool(found) and all(p.suffix == ".txt" for p in found)


def _load_files(spec: str) -> datasets.DatasetDict:
    files = expand(spec)
    suffixes = {p.suffix for p in files}
    if not files or len(suffixes) != 1 or not suffixes <= set(LOADERS):
        raise DataError(f"dataset={spec!r}: expected .txt, .jsonl or .parquet files of one kind, "
                         f"found {sorted(suffixes) or 'none'}")
    by_split = {}
    for path in files:
        by_split.setdefault(split_of(path), []).append(str(path))
    if "train" not in by_split:
        by_split = {"train": [str(p) for p in files]}
    return datasets.load_dataset(LOADERS[suffixes.pop()], data_files=by_split)


def _normalise(dsd: datasets.DatasetDict, cfg: DataConfig) -> datasets.DatasetDict:
    out = {}
    for name, split in dsd.items():
        canonical = SPLIT_ALIASES.get(name)
        if canonical is None:
            continue
        if is_chat(split.column_names, cfg):
            out[canonical] = _conversations(split, cfg)
            continue
        texts = [name for name, feature in split.features.items() if _is_text(feature)]
        if cfg.text_column not in split.column_names:
            raise DataError(f"text_column={cfg.text_column!r}: not a column of dataset="
                            f"{cfg.dataset!r} (its columns: {split.column_names}){_pair_hint(texts)}")
        if not _is_text(split.features[cfg.text_column]):
            raise DataError(f"text_column={cfg.text_column!r}: dataset={cfg.dataset!r} holds "
                             f"{_kind(split.features[cfg.text_column])} there, not text (its text "
                             f"columns: {texts or 'none'})")
        split = split.select_columns([cfg.text_column])
        out[canonical] = split.rename_column(cfg.text_column, "text") if cfg.text_column != "text" else split
    if "train" not in out:
        raise DataError(f"dataset={cfg.dataset!r} has no train split (its splits: {list(dsd)})")
    return datasets.DatasetDict(out)


def _pair_hint(texts: list[str]) -> str:
    """For two or more text columns (`texts`) and no text column: how to read them as conversations."""
    if len(texts) < 2:
        return ""
    return (f". If these are conversations, set data_format='chat', instruction_column={texts[0]!r} and "
            f"response_column={texts[1]!r}; if text, name its column with text_column")


def is_chat(columns: list[str], cfg: DataConfig) -> bool:
    """data_format="chat", or "auto" with a `messages` column, or with the instruction and response
    columns and no text column."""
    if cfg.data_format != "auto":
        return cfg.data_format == "chat"
    pair = {cfg.instruction_column, cfg.response_column} <= set(columns)
    return "messages" in columns or (pair and cfg.text_column not in columns)


def _conversations(split: datasets.Dataset, cfg: DataConfig) -> datasets.Dataset:
    """The split as one `messages` column: as it is, or made from instruction/response columns."""
    columns = split.column_names
    if "messages" in columns:
        return split.select_columns(["messages"])
    if {cfg.instruction_column, cfg.response_column} <= set(columns):
        return split.map(lambda batch: {"messages": chat.from_columns(
            batch[cfg.instruction_column], batch[cfg.response_column])},
            batched=True, remove_columns=columns, desc="conversations from columns")
    raise DataError(f"data_format={cfg.data_format!r}: dataset={cfg.dataset!r} has no 'messages' column "
                     f"and not both instruction_column={cfg.instruction_column!r} and response_column="
                     f"{cfg.response_column!r} (its columns: {columns}); name them, or use "
                     "data_format='text'")


def _is_text(feature) -> bool:
    return getattr(feature, "dtype", None) in ("string", "large_string")


def _kind(feature) -> str:
    """'int64 values', 'Sequence values', ... (a feature's repr differs across datasets versions)."""
    return f"{getattr(feature, 'dtype', None) or type(feature).__name__} values"


def python_docs() -> list[str]:
    """The built-in offline corpus: Python's language-reference topics and stdlib docstrings.

    Docstrings are read with `ast`, so nothing is imported; about 1.5-2 MB of English.
    """
    from pydoc_data.topics import topics

    documents = [text for _, text in sorted(topics.items())]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
    for path in sorted(stdlib.rglob("*.py")):
        if skip.intersection(path.relative_to(stdlib).parts):
            continue
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):
            continue
        nodes = (n for n in ast.walk(tree)
                 if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)))
        docstrings = [d for d in map(ast.get_docstring, nodes) if d]
        if docstrings:
            documents.append("\n\n".join(docstrings))
    return documents


def is_local_dataset(spec: str) -> bool:
    """Local path or glob, as opposed to a Hub id such as 'Salesforce/wikitext'."""
    return (spec.startswith(("/", ".", "~")) or any(c in spec for c in "*?[")
            or spec.endswith((".txt", ".jsonl", ".json", ".parquet")) or Path(spec).exists())


def spec_problems(spec: str) -> list[str]:
    """An unknown built-in corpus, or a local path or glob that matches nothing."""
    if spec.startswith("builtin:") and spec not in BUILTIN_DATASETS:
        return [f"dataset={spec!r}: the built-in corpora are {', '.join(BUILTIN_DATASETS)}"]
    if spec.startswith("builtin:") or not is_local_dataset(spec):
        return []
    if not glob.glob(str(Path(spec).expanduser())):
        return [f"dataset={spec!r}: no such file, directory or glob match"]
    return []
