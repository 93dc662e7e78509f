from dataclasses import replace

import pytest
import torch

from nblib import model
from nblib.setup import params


class FakeTokenizer:
    bos_token_id = eos_token_id = 50256

    def __len__(self):
        return 50257


def test_guide_config_has_19_3m_parameters_6_3m_outside_embeddings():
    net = model.build(params.resolve({"preset": "kaggle-t4"}).model, FakeTokenizer())
    counts = model.parameter_counts(net)
    assert round(counts["total"] / 1e6, 2) == 19.32
    assert round(counts["non_embedding"] / 1e6, 2) == 6.32
    assert "19.32M parameters, 6.32M outside the embeddings" in model.describe(net)


def test_vocab_none_takes_the_tokenizers_and_smaller_is_refused(tmp_path):
    cfg = params.resolve({"preset": "smoke", "output_dir": str(tmp_path)}).model
    assert model.gpt2_config(cfg, FakeTokenizer()).unpadded_vocab_size == 50257
    with pytest.raises(ValueError, match="vocab_size=100: smaller than the tokenizer's 50257"):
        model.gpt2_config(replace(cfg, vocab_size=100), FakeTokenizer())


def test_vocabulary_is_padded_to_a_multiple_of_64_inside_the_run_only():
    cfg = replace(params.resolve({"preset": "smoke"}).model, vocab_size=None)
    net = model.build(cfg, FakeTokenizer())
    assert net.config.vocab_size == 50304 and net.transformer.wte.weight.shape[0] == 50304
    assert "vocabulary 50,257 (padded to 50,304" in model.describe(net)

    saved = model.checkpoint_weights(net)
    assert saved["model_state_dict"]["transformer.wte.weight"].shape[0] == 50257
    assert saved["vocab_padding"]["transformer.wte.weight"].shape[0] == 47

    torch.manual_seed(1)
    other = model.build(cfg, FakeTokenizer())
    compiled_keys = {f"_orig_mod.{k}": v for k, v in saved["model_state_dict"].items()}
    model.load_weights(other, {**saved, "model_state_dict": compiled_keys})
    for name, tensor in net.state_dict().items():
        assert torch.equal(other.state_dict()[name], tensor), name  # padding rows included

    plain = model.unpadded(net)
    assert plain.config.vocab_size == 50257 and not hasattr(plain.config, "unpadded_vocab_size")
    ids = torch.tensor([[1, 2, 50256]])
    # The same weights; a matmul over 50257 rows may block differently from one over 50304, so
    # the logits agree to float rounding, not bitwise (6e-8 apart with torch 2.13 on CPU).
    torch.testing.assert_close(plain(ids).logits, net(ids).logits[..., :50257], rtol=1e-5, atol=1e-6)
    assert model.parameter_counts(plain) == model.parameter_counts(net)


def test_the_fused_gelu_computes_gpt2s_activation_and_keeps_less_for_backward():
    cfg = replace(params.resolve({"preset": "smoke"}).model, dropout=0.0)
    torch.manual_seed(0)
    fused = model.build(cfg, FakeTokenizer())
    plain = type(fused)(fused.config)  # transformers' own modules, gelu_new
    plain.load_state_dict(fused.state_dict())
    assert fused.config.activation_function == "gelu_new"  # what every export says
    inputs = torch.randint(0, 50257, (2, 16))
    saved = {}
    for name, net in (("fused", fused), ("plain", plain)):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, sizes=sizes: sizes.append(t.numel()) or t, lambda t: t):
            logits = net(input_ids=inputs).logits
        saved[name] = (logits, sum(sizes))
    assert torch.allclose(saved["fused"][0], saved["plain"][0], atol=1e-5)
    assert saved["fused"][1] < saved["plain"][1]
