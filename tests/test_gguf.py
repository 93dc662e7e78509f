"""final_model.gguf, checked by llama.cpp itself (llama-cpp-python): its tokens and next-token
logits against the Hugging Face model's."""
import contextlib
import importlib.util
import json
import re

import numpy as np
import pytest
import torch
from conftest import needs, tiny_params
from test_chat import write_conversations
from test_finetune import finetune_params
from test_notebook import execute, outputs_text
from transformers import AutoTokenizer, GPT2LMHeadModel

from nblib.export import gguf_file
from nblib.setup import params

PROMPT = "the old king wrote a song of stone and light during the first war"
# Largest |llama.cpp - transformers| logit, as a share of the largest |logit|. Measured on the
# guide-like test model: float32 3e-4 (llama.cpp's GELU is tabulated), float16 8e-4, bfloat16 5.5e-3.
# Quantized files, against the model with the file's weights (`as_written`): q8_0 1.2e-2, q4_0 1.3e-2,
# as llama.cpp also rounds the activations to 8 bits for those matrix products.
TOLERANCE = {"float32": 2e-3, "float16": 5e-3, "bfloat16": 2e-2, "q8_0": 2.5e-2, "q4_0": 2.5e-2}


def llama_cpp_logits(gguf_file, ids: list[int], text: str) -> tuple[np.ndarray, list[int]]:
    """llama.cpp's logits after each of `ids`, and its own tokens for `text`."""
    from llama_cpp import Llama

    with contextlib.closing(Llama(str(gguf_file), n_ctx=64, logits_all=True, verbose=False)) as llm:
        tokens = llm.tokenize(text.encode(), add_bos=False, special=True)
        llm.eval(ids)
        return np.array(llm.scores[:len(ids)]), tokens


def assert_llama_cpp_agrees(model_dir, gguf_file, dtype: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = GPT2LMHeadModel.from_pretrained(str(model_dir)).float().eval()
    ids = tokenizer(PROMPT)["input_ids"]
    theirs, their_ids = llama_cpp_logits(gguf_file, ids, PROMPT)
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    assert their_ids == ids  # the same "gpt2" BPE, merges and pre-tokenizer
    assert np.abs(theirs - ours).max() <= TOLERANCE[dtype] * np.abs(ours).max()
    assert (theirs.argmax(-1) == ours.argmax(-1)).mean() >= 0.9


@pytest.mark.slow
@needs("gguf")
@needs("llama_cpp")
def test_the_notebooks_gguf_gives_llama_cpp_the_models_logits(tmp_path, pretrained_dir, wikitext_file):
    run = tmp_path / "run"
    values = {**finetune_params(tmp_path, pretrained_dir, wikitext_file), "max_steps": 4}
    execute(tmp_path, **values, export_gguf=True, export_dtype="float16")
    assert_llama_cpp_agrees(run / "final_model", run / "final_model" / "model.gguf", "float16")
    execute(tmp_path, **values)  # the finished run again, without export_gguf: the export is replaced whole
    assert (run / "final_model" / "model.safetensors").is_file() and not (run / "final_model" / "model.gguf").exists()


@needs("gguf")
@needs("llama_cpp")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_each_dtype_reads_back_in_llama_cpp(tmp_path, pretrained_dir, dtype):
    with torch.no_grad():  # weights of a trained size: the fixture's initial ones give logits near 0
        model = GPT2LMHeadModel.from_pretrained(str(pretrained_dir))
        for weight in model.parameters():
            weight.add_(torch.randn_like(weight) * 0.05)
        model.save_pretrained(str(tmp_path / "model"))
    AutoTokenizer.from_pretrained(str(pretrained_dir)).save_pretrained(str(tmp_path / "model"))
    out = gguf_file.write(tmp_path / "model", tmp_path / "model.gguf", dtype)
    assert_llama_cpp_agrees(tmp_path / "model", out, dtype)


def test_export_gguf_without_the_package_is_refused_at_setup(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ValueError, match=r"export_gguf=True: writing GGUF needs the optional gguf package "
                                         r"\(pip install gguf\)"):
        params.resolve(tiny_params(tmp_path, export_gguf=True))


def test_export_gguf_of_an_adapter_alone_is_refused(tmp_path, pretrained_dir):
    with pytest.raises(ValueError, match=r"export_gguf=True: GGUF holds a whole model.*lora_export='merged'"):
        params.resolve(tiny_params(tmp_path, init_from=str(pretrained_dir), n_embd=None, n_layer=None, n_head=None,
                                   n_inner=None, n_positions=None, lora_r=4, lora_export="adapter", export_gguf=True))


def tensor_types(path) -> dict[str, str]:
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


def perturbed_model(tmp_path, pretrained_dir, **config):
    """The fixture's GPT-2 (or one of another shape) with weights of a trained size, saved."""
    from transformers import GPT2Config

    with torch.no_grad():
        model = (GPT2LMHeadModel(GPT2Config(**{**GPT2Config.from_pretrained(str(pretrained_dir)).to_dict(), **config}))
                 if config else GPT2LMHeadModel.from_pretrained(str(pretrained_dir)))
        for weight in model.parameters():
            weight.add_(torch.randn_like(weight) * 0.05)
        model.save_pretrained(str(tmp_path / "model"))
    AutoTokenizer.from_pretrained(str(pretrained_dir)).save_pretrained(str(tmp_path / "model"))
    return tmp_path / "model"


def as_written(model_dir, kind: str) -> GPT2LMHeadModel:
    """The model in `model_dir` with each weight as the GGUF file of `kind` holds it: quantized by
    the gguf package and read back; the head untied, as llama.cpp keeps its own `output.weight`."""
    import gguf

    model = GPT2LMHeadModel.from_pretrained(str(model_dir)).float().eval()
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2, model.config.n_layer)
    model.lm_head.weight = torch.nn.Parameter(model.transformer.wte.weight.detach().clone())
    with torch.no_grad():
        for key, weight in model.named_parameters():
            name = ("output.weight" if key == "lm_head.weight"
                    else names.get_name(key, try_suffixes=(".weight", ".bias")))
            stored = weight.T if key.endswith(gguf_file.CONV1D) else weight
            array, raw = gguf_file._encoded(name, stored.contiguous(), gguf_file.tensor_kind(name, stored.dim(), kind))
            read = torch.from_numpy(gguf.quants.dequantize(array, raw) if raw is not None else array.astype(np.float32))
            weight.copy_(read.reshape(stored.shape).T if key.endswith(gguf_file.CONV1D) else read.reshape(stored.shape))
    return model


@needs("gguf")
@needs("llama_cpp")
@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_quantized_files_read_back_in_llama_cpp(tmp_path, pretrained_dir, kind):
    model_dir = perturbed_model(tmp_path, pretrained_dir)
    out = gguf_file.write(model_dir, tmp_path / "model.gguf", kind)
    types = tensor_types(out)
    # llama.cpp's rules: 1-D tensors, norms and the position embedding stay float32; a 4-bit file's head is q8_0
    assert {types[n] for n in types if n.endswith((".bias", "_norm.weight")) or n == "position_embd.weight"} == {"F32"}
    matrices = ("token_embd.weight", "blk.0.attn_qkv.weight", "blk.1.ffn_down.weight")
    assert {types[n] for n in matrices} == {kind.upper()}
    assert types["output.weight"] == "Q8_0"
    # llama.cpp computes what the file holds: the model with its weights quantized and read back
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tokenizer(PROMPT)["input_ids"]
    theirs, _ = llama_cpp_logits(out, ids, PROMPT)
    with torch.no_grad():
        ours = as_written(model_dir, kind)(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(theirs - ours).max() <= TOLERANCE[kind] * np.abs(ours).max()


@needs("gguf")
def test_a_row_the_block_does_not_divide_is_written_as_float16_with_a_log_line(tmp_path, pretrained_dir, caplog):
    model_dir = perturbed_model(tmp_path, pretrained_dir, n_embd=48)  # q4_0's blocks hold 32 values
    out = gguf_file.write(model_dir, tmp_path / "model.gguf", "q4_0")
    types = tensor_types(out)
    assert types["blk.0.ffn_up.weight"] == "F16"  # (192, 48): rows of 48
    assert types["blk.0.ffn_down.weight"] == "Q4_0"  # (48, 192): rows of 192
    assert "blk.0.ffn_up.weight" in caplog.text and "written as float16, as llama.cpp's converter does" in caplog.text


@pytest.mark.slow
@needs("gguf")
@needs("llama_cpp")
def test_the_notebook_exports_a_quantized_gguf_measured_against_float16(tmp_path):
    run, model = tmp_path / "run", tmp_path / "run" / "final_model"
    execute(tmp_path, preset="smoke", output_dir=str(run), export_gguf=True, gguf_type="q8_0", prompts=[])
    assert tensor_types(model / "model.gguf")["blk.0.attn_qkv.weight"] == "Q8_0"
    measured = json.loads((model / gguf_file.TYPES_MEASURED).read_text())
    rows = {row["type"]: row for row in measured["rows"]}
    assert list(rows) == ["float16", "q8_0", "q4_0"] and measured["exported"] == "q8_0"
    # Measured q8_0 over float16: -0.03% on this model, +0.09% on a chat fine-tune, +0.005% on cpu-demo's
    assert rows["q8_0"]["perplexity"] <= 1.005 * rows["float16"]["perplexity"]
    assert rows["q4_0"]["bytes"] < rows["q8_0"]["bytes"] < 0.6 * rows["float16"]["bytes"]
    card = (model / "README.md").read_text()
    assert "| q8_0 (this file) |" in card and f"{rows['q4_0']['perplexity']:.3f}" in card

    nb = execute(tmp_path, preset="smoke", output_dir=str(run), export_gguf=True, gguf_type="q4_0", prompts=[])
    assert tensor_types(model / "model.gguf")["blk.0.attn_qkv.weight"] == "Q4_0"  # the export replaced whole
    assert "| q4_0 (this file) |" in (model / "README.md").read_text()
    text = outputs_text(nb)
    assert "wrote " not in text and "Writing the following files" not in text
    assert "Loading weights" not in json.dumps([cell.get("outputs", []) for cell in nb.cells])  # no bar either
    assert "final_model, with model.gguf (q4_0, " in text
    assert "llama.cpp's perplexity on 8 held-out blocks: float16 " in text


@pytest.mark.slow
@needs("gguf")
@needs("llama_cpp")
def test_a_chat_fine_tune_in_q8_0_and_q4_0_answers_in_its_templates_format(tmp_path, pretrained_dir):
    from llama_cpp import Llama

    dataset = write_conversations(tmp_path / "chat.jsonl", 400)
    execute(tmp_path, preset="smoke", output_dir=str(tmp_path / "run"), init_from=str(pretrained_dir),
            dataset=str(dataset), max_length=64, batch_size=8, gradient_accumulation_steps=1, max_steps=400,
            eval_steps=200, save_steps=200, warmup_steps=10, learning_rate=5e-3, prompts=[],
            export_gguf=True, gguf_type="q4_0")
    final = tmp_path / "run" / "final_model"
    gguf_file.main([str(final), "--type", "q8_0", "--out", str(tmp_path / "q8_0.gguf")])  # the command line's way
    for path in (final / "model.gguf", tmp_path / "q8_0.gguf"):
        with contextlib.closing(Llama(str(path), n_ctx=64, verbose=False)) as llm:  # the GGUF's own chat template
            reply = llm.create_chat_completion([{"role": "user", "content": "What colour is the coal?"}],
                                               temperature=0.0, max_tokens=40)["choices"][0]
        assert reply["finish_reason"] == "stop", path.name  # it ended on <|endoftext|>, as the template's turns do
        assert re.fullmatch(r" Sure\. The \w+ is \w+\.", reply["message"]["content"]), (path.name, reply)


@needs("gguf")
def test_a_failed_measure_is_a_warning_and_the_export_goes_on(tmp_path, pretrained_dir, caplog, monkeypatch):
    from nblib.export import huggingface

    def broken(path, blocks):
        raise RuntimeError("llama_decode returned -1")

    monkeypatch.setattr(gguf_file, "can_measure", lambda: True)
    monkeypatch.setattr(gguf_file, "measure", broken)
    model = GPT2LMHeadModel.from_pretrained(str(pretrained_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(pretrained_dir))
    out = huggingface.final_model(model, tokenizer, tmp_path, export_gguf=True, gguf_type="q8_0",
                                  held_out=np.zeros((2, 9), dtype=np.int64))
    assert (out / "model.gguf").is_file() and not (out / gguf_file.TYPES_MEASURED).exists()
    assert "llama.cpp's measure of the GGUF types was skipped: RuntimeError: llama_decode returned -1" in caplog.text
