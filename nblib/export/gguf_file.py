"""`final_model/model.gguf`: a GPT-2 in Hugging Face format, as llama.cpp reads it.

The layout is llama.cpp's own for GPT-2 (`convert_hf_to_gguf.py`, class GPT2Model): the `gguf`
package's tensor-name map, the Conv1D matrices transposed to (out, in), the tied head written
out as `output.weight`, and a "gpt2" byte-level BPE vocabulary with the "gpt-2" pre-tokenizer,
its merges, special tokens and chat template. Matrices take the export's dtype; biases and
norms stay float32, as llama.cpp keeps them.

    python -m nblib.export.gguf_file runs/cpu-demo/final_model --dtype float16
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, GPT2LMHeadModel

from nblib import files

log = logging.getLogger(__name__)

INSTALL = "pip install gguf"
CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
SKIPPED = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of old transformers versions


def availability_problems(export_gguf: bool) -> list[str]:
    if export_gguf and importlib.util.find_spec("gguf") is None:
        return [f"export_gguf=True: writing GGUF needs the optional gguf package ({INSTALL}); "
                "or set export_gguf=False"]
    return []


def write(model_dir: Path, out: Path, dtype: str = "float32") -> Path:
    """Convert the Hugging Face GPT-2 in `model_dir` into the GGUF file `out` (written atomically).

    Raises:
        ValueError: the directory holds no plain GPT-2 (a LoRA adapter alone), or its tokenizer
            is not a GPT-2-style byte-level BPE, which llama.cpp's "gpt2" vocabulary needs.
    """
    import gguf

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"export_gguf: {model_dir} holds no full model (a LoRA adapter alone?); "
                         "export it with lora_export='merged'")
    model = GPT2LMHeadModel.from_pretrained(str(model_dir)).float()  # a 16-bit export read back in full
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    _check_byte_level(tokenizer, model_dir)
    c = model.config

    def fill(path: Path) -> None:
        writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GPT2])
        writer.add_name(model_dir.name)
        writer.add_block_count(c.n_layer)
        writer.add_context_length(c.n_positions)
        writer.add_embedding_length(c.n_embd)
        writer.add_feed_forward_length(c.n_inner or 4 * c.n_embd)
        writer.add_head_count(c.n_head)
        writer.add_layer_norm_eps(c.layer_norm_epsilon)
        writer.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[dtype]))
        _add_vocabulary(writer, tokenizer, c.vocab_size, model_dir)
        for name, array, raw in _tensors(model, dtype):
            writer.add_tensor(name, array, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    files.atomic_write(Path(out), fill)
    log.info("wrote %s (%s)", out, dtype)
    return Path(out)


FILE_TYPES = {"float32": "ALL_F32", "float16": "MOSTLY_F16", "bfloat16": "MOSTLY_BF16"}  # gguf.LlamaFileType


def _tensors(model: GPT2LMHeadModel, dtype: str):
    """(GGUF name, array, raw dtype or None) for every weight; the tied head as `output.weight`."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2, model.config.n_layer)
    weights = {k: v for k, v in model.state_dict().items() if not k.endswith(SKIPPED) and k != "lm_head.weight"}
    weights["lm_head.weight"] = weights["transformer.wte.weight"]  # llama.cpp reads the head from its own tensor
    for key, tensor in weights.items():
        if key.endswith(CONV1D):
            tensor = tensor.T
        name = "output.weight" if key == "lm_head.weight" else names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"export_gguf: no GGUF name for the weight {key!r}")
        yield (name, *_encoded(tensor.contiguous(), dtype if tensor.dim() == 2 else "float32"))


def _encoded(tensor: torch.Tensor, dtype: str) -> tuple[np.ndarray, object]:
    if dtype == "bfloat16":  # numpy has no bfloat16: its raw 16 bits, typed for the writer
        import gguf

        return tensor.to(torch.bfloat16).view(torch.int16).numpy(), gguf.GGMLQuantizationType.BF16
    return tensor.to(getattr(torch, dtype)).numpy(), None


def _add_vocabulary(writer, tokenizer, vocab_size: int, model_dir: Path) -> None:
    """llama.cpp's "gpt2" vocabulary: tokens by id (added special ones as control tokens, rows the
    tokenizer lacks as unused padding), then merges, special token ids and the chat template."""
    import gguf

    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    special = {i for i, added in tokenizer.added_tokens_decoder.items() if added.special}
    tokens, types = [], []
    for i in range(vocab_size):
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        types.append(gguf.TokenType.UNUSED if i not in by_id else
                     gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(str(model_dir), load_merges=True, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)


def _check_byte_level(tokenizer, model_dir: Path) -> None:
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    pre = spec.get("pre_tokenizer") or {}
    if spec["model"]["type"] != "BPE" or pre.get("type") != "ByteLevel":
        raise ValueError(f"export_gguf: the tokenizer in {model_dir} is not a GPT-2-style byte-level "
                         "BPE, which llama.cpp's gpt2 vocabulary needs; set export_gguf=False")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a final_model directory as GGUF for llama.cpp")
    parser.add_argument("model", type=Path, help="a final_model directory (Hugging Face GPT-2)")
    parser.add_argument("--out", type=Path, help="the .gguf file (default: model.gguf in the directory, "
                        "where the notebook's export puts it)")
    parser.add_argument("--dtype", choices=tuple(FILE_TYPES), default="float32")
    args = parser.parse_args(argv)
    print(write(args.model, args.out or args.model / "model.gguf", args.dtype))


if __name__ == "__main__":
    main()
