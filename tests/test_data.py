import numpy as np
import pytest
from conftest import tiny_params

from nblib import data
from nblib.setup import params


def test_prepare_packs_blocks_with_end_of_text_between_articles(tiny_config):
    corpus = data.prepare(tiny_config)
    eos = corpus.tokenizer.eos_token_id
    blocks = corpus.blocks("train")
    assert blocks[:3].shape == (3, tiny_config.train.max_length + 1)
    assert corpus.tokens["train"].dtype == np.uint16
    text = corpus.tokenizer.decode(corpus.tokens["train"][:400])
    assert "<|endoftext|> = Article" in text and " = = History = = " in text
    assert (corpus.tokens["train"] == eos).sum() >= 40  # one per training article
    assert set(corpus.tokens) == {"train", "validation", "test"}


def test_second_prepare_reuses_the_cache_without_tokenizing(tiny_config, monkeypatch):
    first = data.prepare(tiny_config)
    monkeypatch.setattr(data.cache, "build_cache", lambda *a: pytest.fail("tokenized again"))
    second = data.prepare(tiny_config)
    assert second.cache_dir == first.cache_dir
    assert np.array_equal(second.tokens["train"], first.tokens["train"])


def test_other_max_length_reuses_tokens_other_tokenizer_does_not(tmp_path, wikitext_file, tokenizer_dir):
    base = tiny_params(tmp_path, dataset=str(wikitext_file), tokenizer=str(tokenizer_dir))
    a = params.resolve(base)
    b = params.resolve({**base, "max_length": 8})
    c = params.resolve({**base, "tokenizer": "bpe:280"})
    assert data.cache_key(a) == data.cache_key(b) != data.cache_key(c)
    assert data.prepare(b).blocks("train").size == 9


def test_changed_source_file_invalidates_the_cache(tmp_path, tokenizer_dir):
    path = tmp_path / "corpus.txt"
    path.write_text("one paragraph\n\nanother one\n\nand a third\n" * 20)
    cfg = params.resolve(tiny_params(tmp_path, dataset=str(path), tokenizer=str(tokenizer_dir)))
    before = data.cache_key(cfg)
    path.write_text(path.read_text() + "more\n")
    assert data.cache_key(cfg) != before


def test_bpe_tokenizer_is_trained_and_saved_with_the_cache(tmp_path, wikitext_file):
    cfg = params.resolve(tiny_params(tmp_path, dataset=str(wikitext_file), tokenizer="bpe:280"))
    corpus = data.prepare(cfg)
    assert len(corpus.tokenizer) == 280
    assert (corpus.cache_dir / "tokenizer" / "tokenizer.json").is_file()
    ids = corpus.tokenizer("the river city")["input_ids"]
    assert corpus.tokenizer.decode(ids) == "the river city"


def test_interrupted_cache_build_leaves_no_cache(tiny_config, monkeypatch):
    def broken(cfg, directory):
        (directory / "train.bin").write_bytes(b"partial")
        raise KeyboardInterrupt
    monkeypatch.setattr(data.cache, "build_cache", broken)
    with pytest.raises(KeyboardInterrupt):
        data.prepare(tiny_config)
    assert not (tiny_config.output_dir / "data_cache" / data.cache_key(tiny_config)).exists()


def test_stride_gives_overlapping_windows_and_the_remainder_can_be_kept():
    flat = np.arange(23, dtype=np.uint16)
    corpus = data.Corpus(tokenizer=None, cache_dir=None, tokens={"train": flat}, max_length=4)
    disjoint = corpus.blocks("train")
    assert len(disjoint) == 4 and disjoint[np.array([1])].tolist() == [[5, 6, 7, 8, 9]]
    overlapping = data.Corpus(None, None, {"train": flat}, max_length=4, stride=2).blocks("train")
    assert overlapping[:3].tolist() == [[0, 1, 2, 3, 4], [2, 3, 4, 5, 6], [4, 5, 6, 7, 8]]
    assert len(overlapping) == 10  # starts 0, 2, ..., 18
    kept = data.Corpus(None, None, {"train": flat}, max_length=4, drop_remainder=False).blocks("train")
    assert len(kept) == 5 and kept[np.array([4])].tolist() == [[18, 19, 20, 21, 22]]
