import json

import pytest
from conftest import tiny_params

from nblib import data
from nblib.data import bundle
from nblib.setup.params import resolve


@pytest.fixture
def made_bundle(tmp_path, wikitext_file, tokenizer_dir):
    params = tiny_params(tmp_path / "prep", dataset=str(wikitext_file), tokenizer=str(tokenizer_dir))
    cfg = resolve(params)
    corpus = data.prepare(cfg)
    out = bundle.write(corpus.cache_dir, cfg, tmp_path / "bundle", "someone/gpt2-tokens")
    return out, params, corpus


def test_bundle_holds_tokens_tokenizer_config_metadata_and_manifest(made_bundle):
    out, params, _ = made_bundle
    manifest = json.loads((out / bundle.MANIFEST).read_text())
    assert set(manifest["files"]) >= {"train.bin", "validation.bin", "test.bin", "meta.json",
                                      "tokenizer/tokenizer.json", "run_config.json", "dataset-metadata.json"}
    assert manifest["missing"] == [] and manifest["max_length"] == params["max_length"]
    assert all(len(f["sha256"]) == 64 and f["size"] > 0 for f in manifest["files"].values())
    assert json.loads((out / "dataset-metadata.json").read_text())["id"] == "someone/gpt2-tokens"


def test_a_run_from_the_bundle_skips_tokenization(made_bundle, tmp_path, monkeypatch):
    out, params, prepared = made_bundle
    monkeypatch.setattr(data.cache, "build_cache", lambda *a: pytest.fail("tokenized again"))
    corpus = data.prepare(resolve({**params, "dataset": str(out), "output_dir": str(tmp_path / "run")}))
    assert corpus.tokens["train"].tolist() == prepared.tokens["train"].tolist()
    assert not (tmp_path / "run" / "data_cache").exists()


def test_an_altered_file_or_different_settings_are_refused_by_name(made_bundle, tmp_path):
    out, params, _ = made_bundle
    run = {**params, "dataset": str(out), "output_dir": str(tmp_path / "run")}
    with pytest.raises(ValueError, match=r"max_length: bundle 16, run 8"):
        data.prepare(resolve({**run, "max_length": 8}))
    with pytest.raises(ValueError, match=r"tokenizer: bundle .*, run 'bpe:300'"):
        data.prepare(resolve({**run, "tokenizer": "bpe:300"}))
    with open(out / "train.bin", "r+b") as f:
        f.write(b"\x00\x01")
    with pytest.raises(ValueError, match=r"train.bin: its checksum does not match"):
        data.prepare(resolve(run))
