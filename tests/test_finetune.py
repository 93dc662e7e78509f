"""Fine-tuning: init_from a local Hugging Face model, with and without LoRA, through the notebook."""
import importlib.util
import json

import pytest
import torch
from conftest import needs, tiny_params
from test_notebook import execute, outputs_text
from transformers import AutoModelForCausalLM, GPT2LMHeadModel

from nblib.setup import params
from nblib.training import checkpoint


def test_init_from_takes_the_pretrained_shape_and_tokenizer(tmp_path, pretrained_dir):
    cfg = params.resolve(tiny_params(tmp_path, init_from=str(pretrained_dir), n_embd=None, n_layer=None,
                                     n_head=None, n_inner=None, n_positions=None))
    m = cfg.model
    assert (m.vocab_size, m.n_positions, m.n_embd, m.n_layer, m.n_head, m.n_inner) == (300, 64, 32, 2, 2, 128)
    assert cfg.data.tokenizer == str(pretrained_dir)


def test_conflicting_model_parameters_are_reported_not_ignored(tmp_path, pretrained_dir):
    with pytest.raises(ValueError) as error:
        params.resolve(tiny_params(tmp_path, init_from=str(pretrained_dir), n_layer=6, tokenizer="bpe:512"))
    message = str(error.value)
    assert "n_layer=6: init_from=" in message and "has n_layer=2; leave it None" in message
    assert "tokenizer='bpe:512'" in message


def test_init_from_a_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"init_from='/no/such/model': not a Hugging Face model directory"):
        params.resolve(tiny_params(tmp_path, init_from="/no/such/model"))


def test_lora_needs_a_pretrained_model_and_peft(tmp_path, pretrained_dir, monkeypatch):
    with pytest.raises(ValueError, match="lora_r=4: LoRA adapts a pretrained model; set init_from"):
        params.resolve(tiny_params(tmp_path, lora_r=4))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    with pytest.raises(ValueError, match=r"LoRA needs the optional peft package \(pip install peft\)"):
        params.resolve(tiny_params(tmp_path, init_from=str(pretrained_dir), lora_r=4, n_embd=None,
                                   n_layer=None, n_head=None, n_inner=None, n_positions=None))


def finetune_params(tmp_path, pretrained_dir, wikitext_file, **overrides) -> dict:
    return dict(preset="smoke", output_dir=str(tmp_path / "run"), init_from=str(pretrained_dir),
                dataset=str(wikitext_file), max_length=32, batch_size=4, gradient_accumulation_steps=1,
                max_steps=8, eval_steps=4, save_steps=4, learning_rate=1e-3, resume_from_checkpoint="auto",
                **overrides)


@pytest.mark.slow
@pytest.mark.compat
def test_finetune_through_the_notebook_resumes_and_exports(tmp_path, pretrained_dir, wikitext_file):
    params = finetune_params(tmp_path, pretrained_dir, wikitext_file)
    text = outputs_text(execute(tmp_path, **params))
    assert "GPT-2: 2 layers, 2 heads, n_embd 32, context 64, vocabulary 300;" in text
    execute(tmp_path, **{**params, "max_steps": 12})  # a second session resumes at step 8
    run = tmp_path / "run"
    history = json.loads((run / "training_history.json").read_text())
    assert [r["step"] for r in history] == [4, 8, 12]
    final = AutoModelForCausalLM.from_pretrained(str(run / "final_model"))
    pretrained = GPT2LMHeadModel.from_pretrained(str(pretrained_dir))
    assert final.config.n_embd == 32 and final.config.vocab_size == 300
    assert not torch.equal(final.transformer.h[0].mlp.c_fc.weight, pretrained.transformer.h[0].mlp.c_fc.weight)


@needs("peft")
def test_lora_finetune_trains_adapters_only_resumes_and_exports_merged_or_adapter(tmp_path, pretrained_dir,
                                                                                 wikitext_file):
    params = finetune_params(tmp_path, pretrained_dir, wikitext_file, lora_r=4, lora_alpha=8.0)
    text = outputs_text(execute(tmp_path, **params))
    assert "trainable: 1,024 (" in text  # rank 4 on c_attn: 2 layers x 4 x (32 in + 96 out)
    run = tmp_path / "run"
    saved = checkpoint.load(checkpoint.list_checkpoints(run / "checkpoints")[-1][1])
    assert any("lora_A" in key for key in saved["model_state_dict"]) and saved["optimizer_state_dict"]["state"]

    execute(tmp_path, **{**params, "max_steps": 12})  # resumes with the adapters and AdamW's state
    assert [r["step"] for r in json.loads((run / "training_history.json").read_text())] == [4, 8, 12]
    merged = GPT2LMHeadModel.from_pretrained(str(run / "final_model"))
    pretrained = GPT2LMHeadModel.from_pretrained(str(pretrained_dir))
    assert torch.equal(merged.transformer.h[0].mlp.c_fc.weight, pretrained.transformer.h[0].mlp.c_fc.weight)
    assert not torch.equal(merged.transformer.h[0].attn.c_attn.weight, pretrained.transformer.h[0].attn.c_attn.weight)

    execute(tmp_path, **{**params, "max_steps": 12, "lora_export": "adapter", "export_dtype": "float16"})
    assert (run / "final_model" / "adapter_config.json").is_file()
    assert stored_dtypes(run / "final_model" / "adapter_model.safetensors") == {torch.float32}  # as trained
    from peft import AutoPeftModelForCausalLM
    adapter = AutoPeftModelForCausalLM.from_pretrained(str(run / "final_model"))
    ids = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(adapter(ids).logits, merged(ids).logits, rtol=1e-4, atol=1e-4)

    execute(tmp_path, **{**params, "max_steps": 12, "export_dtype": "float16"})  # the merged export follows it
    assert stored_dtypes(run / "final_model" / "model.safetensors") == {torch.float16}
    half = GPT2LMHeadModel.from_pretrained(str(run / "final_model"), dtype=torch.float32)
    torch.testing.assert_close(half(ids).logits, merged(ids).logits, rtol=2e-2, atol=2e-2)


def stored_dtypes(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as weights:
        return {weights.get_tensor(key).dtype for key in weights.keys()}
