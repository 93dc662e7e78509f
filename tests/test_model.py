import pytest

from nblib import config, model


class FakeTokenizer:
    bos_token_id = eos_token_id = 50256

    def __len__(self):
        return 50257


def test_guide_config_has_19_3m_parameters_6_3m_outside_embeddings():
    net = model.build(config.resolve({"preset": "kaggle-t4"}).model, FakeTokenizer())
    counts = model.parameter_counts(net)
    assert round(counts["total"] / 1e6, 2) == 19.32
    assert round(counts["non_embedding"] / 1e6, 2) == 6.32
    assert "19.32M parameters, 6.32M outside the embeddings" in model.describe(net)


def test_vocab_none_takes_the_tokenizers_and_smaller_is_refused(tmp_path):
    cfg = config.resolve({"preset": "smoke", "output_dir": str(tmp_path)}).model
    assert model.gpt2_config(cfg, FakeTokenizer()).vocab_size == 50257
    from dataclasses import replace
    with pytest.raises(ValueError, match="vocab_size=100: smaller than the tokenizer's 50257"):
        model.gpt2_config(replace(cfg, vocab_size=100), FakeTokenizer())
