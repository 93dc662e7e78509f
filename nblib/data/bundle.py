"""A dataset bundle: the tokens prepared once, uploaded as a Kaggle dataset, reused every session."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from nblib import files
from nblib.console import DataError
from nblib.setup.config import GPT2_TOKENIZERS, RunConfig

MANIFEST = "bundle_manifest.json"
EXPECTED = ("train.bin", "validation.bin", "test.bin", "meta.json", "tokenizer/tokenizer.json",
            "tokenizer/tokenizer_config.json")


def is_bundle(spec: str) -> bool:
    return bool(spec) and (Path(spec) / MANIFEST).is_file()


def write(cache_dir: Path, cfg: RunConfig, out: Path, dataset_id: str) -> Path:
    """Copy a prepared cache (tokens, conversations' loss masks, tokenizer) into `out` with the
    resolved config, Kaggle's dataset-metadata.json and a manifest of every file's size and
    sha256 (and of anything missing)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(p for p in Path(cache_dir).rglob("*") if p.is_file() and p.name != files.COMPLETE_MARKER):
        (out / path.relative_to(cache_dir)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, out / path.relative_to(cache_dir))
    files.write_json(out / "run_config.json", cfg.to_dict())
    files.write_json(out / "dataset-metadata.json", {
        "title": f"GPT-2 tokens {cache_dir.name}"[:50], "id": dataset_id,
        "licenses": [{"name": "other"}]})
    listed = [p for p in sorted(out.rglob("*")) if p.is_file() and p.name != MANIFEST]
    files.write_json(out / MANIFEST, {
        "tokenizer": cfg.data.tokenizer, "max_length": cfg.train.max_length,
        "dataset": cfg.data.dataset, "dataset_config": cfg.data.dataset_config,
        "files": {str(p.relative_to(out)): {"size": p.stat().st_size, "sha256": files.sha256(p)} for p in listed},
        "missing": [name for name in EXPECTED if not (out / name).is_file()],
    })
    return out


def verify(directory: Path, cfg: RunConfig) -> None:
    """Check a bundle against its manifest and against this run's settings.

    Raises:
        ValueError: a missing or altered file, or a tokenizer or max_length that differs.
    """
    manifest = json.loads((directory / MANIFEST).read_text())
    problems = [f"missing when the bundle was made: {name}" for name in manifest["missing"]]
    for name, expected in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif path.stat().st_size != expected["size"] or files.sha256(path) != expected["sha256"]:
            problems.append(f"{name}: its checksum does not match the manifest (altered or truncated)")
    tokenizer = cfg.data.tokenizer
    if {manifest["tokenizer"], tokenizer} - set(GPT2_TOKENIZERS) and manifest["tokenizer"] != tokenizer:
        problems.append(f"tokenizer: bundle {manifest['tokenizer']!r}, run {tokenizer!r}")
    if manifest["max_length"] != cfg.train.max_length:
        problems.append(f"max_length: bundle {manifest['max_length']}, run {cfg.train.max_length}")
    if problems:
        raise DataError(f"dataset={str(directory)!r} is a bundle this run cannot use:\n  - "
                         + "\n  - ".join(problems))
