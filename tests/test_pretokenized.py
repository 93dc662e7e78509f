import json

import numpy as np
import pytest
from conftest import tiny_params

from nblib import data
from nblib.setup import params


def write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def records(n, key="input_ids", length=30, seed=0):
    rng = np.random.default_rng(seed)
    return [{key: rng.integers(1, 250, size=length).tolist(), "meta": i} for i in range(n)]


@pytest.mark.parametrize("key", ["input_ids", "tokens"])
def test_token_id_records_are_packed_without_tokenizing(tmp_path, tokenizer_dir, key, monkeypatch):
    source = write_jsonl(tmp_path / "ids.jsonl", records(200, key))
    monkeypatch.setattr(data.cache, "_tokenize", lambda *a, **k: pytest.fail("tokenized text"))
    cfg = params.resolve(tiny_params(tmp_path, dataset=str(source), tokenizer=str(tokenizer_dir)))
    corpus = data.prepare(cfg)
    eos = corpus.tokenizer.eos_token_id
    sizes = {s: len(t) for s, t in corpus.tokens.items()}
    assert sizes == {"train": 180 * 31, "validation": 10 * 31, "test": 10 * 31}
    train = np.asarray(corpus.tokens["train"])
    assert (train[::31] == eos).all() and (train.reshape(180, 31)[:, 1:] != eos).all()
    originals = {tuple(r[key]) for r in records(200, key)}
    assert all(tuple(row) in originals for row in train.reshape(180, 31)[:, 1:].tolist())


def test_split_files_stride_and_remainder(tmp_path, tokenizer_dir):
    for split in ("train", "valid", "test"):
        write_jsonl(tmp_path / f"{split}.jsonl", records(4, length=19, seed=len(split)))
    values = tiny_params(tmp_path, dataset=str(tmp_path / "*.jsonl"), tokenizer=str(tokenizer_dir),
                         max_length=16, n_positions=32, stride=8, drop_remainder=False)
    corpus = data.prepare(params.resolve(values))
    assert len(corpus.tokens["train"]) == 4 * 20
    blocks = corpus.blocks("train")
    assert len(blocks) == 9  # starts 0, 8, ..., 56, then one ending at token 80
    assert blocks[np.array([8])].tolist()[0] == corpus.tokens["train"][-17:].tolist()


@pytest.mark.parametrize("line, message", [
    ('{"input_ids": [1, 2, 99999]}', r"ids.jsonl:3: token id 99999 is outside the tokenizer's vocabulary \[0, 300\)"),
    ('{"input_ids": []}', r"ids.jsonl:3: 'input_ids' must be a non-empty list"),
    ('{"input_ids": [1, null]}', r"ids.jsonl:3: token id None is outside"),
    ('not json', r"ids.jsonl:3: expected a JSON object with a 'input_ids' list"),
])
def test_bad_records_name_the_file_and_line(tmp_path, tokenizer_dir, line, message):
    source = tmp_path / "ids.jsonl"
    source.write_text('{"input_ids": [1, 2]}\n{"input_ids": [3]}\n' + line + "\n")
    cfg = params.resolve(tiny_params(tmp_path, dataset=str(source), tokenizer=str(tokenizer_dir)))
    with pytest.raises(ValueError, match=message):
        data.prepare(cfg)


def test_token_ids_with_a_bpe_spec_ask_for_the_tokenizer_that_made_them(tmp_path):
    source = write_jsonl(tmp_path / "ids.jsonl", records(20))
    cfg = params.resolve(tiny_params(tmp_path, dataset=str(source), tokenizer="bpe:300"))
    with pytest.raises(ValueError, match=r"holds token ids, so a BPE cannot be trained on it"):
        data.prepare(cfg)
