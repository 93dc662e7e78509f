"""final_model.gguf, checked by llama.cpp itself (llama-cpp-python): its tokens and next-token
logits against the Hugging Face model's."""
import contextlib
import importlib.util

import numpy as np
import pytest
import torch
from conftest import needs, tiny_params
from test_finetune import finetune_params
from test_notebook import execute
from transformers import AutoTokenizer, GPT2LMHeadModel

from nblib.export import gguf_file
from nblib.setup import params

PROMPT = "the old king wrote a song of stone and light during the first war"
# Largest |llama.cpp - transformers| logit, as a share of the largest |logit|. Measured on the
# guide-like test model: float32 3e-4 (llama.cpp's GELU is tabulated), float16 8e-4, bfloat16 5.5e-3.
TOLERANCE = {"float32": 2e-3, "float16": 5e-3, "bfloat16": 2e-2}


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
