"""`final_model/model.gguf`: a GPT-2 in Hugging Face format, as llama.cpp reads it, in float32,
float16, bfloat16 or quantized (q8_0, q4_0).

The layout is llama.cpp's own for GPT-2 (`convert_hf_to_gguf.py`, class GPT2Model): the `gguf`
package's tensor-name map, the Conv1D matrices transposed to (out, in), the tied head written
out as `output.weight`, and a "gpt2" byte-level BPE vocabulary with the "gpt-2" pre-tokenizer,
its merges, special tokens and chat template. Which tensors keep more precision follows llama.cpp
(`tensor_kind`); the quantizers are the `gguf` package's own.

    python -m nblib.export.gguf_file runs/cpu-demo/final_model --type q8_0
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, GPT2LMHeadModel, PreTrainedTokenizerBase

from nblib import files
from nblib.console import size
from nblib.history import perplexity
from nblib.training.loss import IGNORE_INDEX

log = logging.getLogger(__name__)

GGUF = "model.gguf"  # inside final_model/, so the export is one unit
TYPES_MEASURED = "gguf_types.json"  # llama.cpp's perplexity, size and speed of each GGUF type
INSTALL = "pip install gguf"
CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
SKIPPED = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of old transformers versions
FILE_TYPES = {"float32": "ALL_F32", "float16": "MOSTLY_F16", "bfloat16": "MOSTLY_BF16",  # gguf.LlamaFileType
              "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0"}
QUANTIZED = ("q8_0", "q4_0")


def availability_problems(export_gguf: bool) -> list[str]:
    if export_gguf and importlib.util.find_spec("gguf") is None:
        return [f"export_gguf=True: writing GGUF needs the optional gguf package ({INSTALL}); "
                "or set export_gguf=False"]
    return []


def write(model_dir: Path, out: Path, kind: str = "float32") -> Path:
    """Convert the Hugging Face GPT-2 in `model_dir` into the GGUF file `out` (written atomically),
    its matrices in `kind` (FILE_TYPES).

    Raises:
        ValueError: the directory holds no plain GPT-2 (a LoRA adapter alone), or its tokenizer
            is not a GPT-2-style byte-level BPE, which llama.cpp's "gpt2" vocabulary needs.
    """
    return _write(_read(model_dir), out, kind)


def _read(model_dir: Path) -> tuple[Path, GPT2LMHeadModel, PreTrainedTokenizerBase]:
    """The model and tokenizer a GGUF is written from, checked (see `write`)."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"export_gguf: {model_dir} holds no full model (a LoRA adapter alone?); "
                         "export it with lora_export='merged'")
    model = GPT2LMHeadModel.from_pretrained(str(model_dir)).float()  # a 16-bit export read back in full
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    _check_byte_level(tokenizer, model_dir)
    return model_dir, model, tokenizer


def _write(source: tuple[Path, GPT2LMHeadModel, PreTrainedTokenizerBase], out: Path, kind: str) -> Path:
    import gguf

    model_dir, model, tokenizer = source
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
        writer.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[kind]))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_vocabulary(writer, tokenizer, c.vocab_size, model_dir)
        for name, array, raw in _tensors(model, kind):
            writer.add_tensor(name, array, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    files.atomic_write(Path(out), fill)
    log.debug("wrote %s (%s)", out, kind)
    return Path(out)


def tensor_kind(name: str, dims: int, kind: str) -> str:
    """What a tensor is written in, by llama.cpp's rules: 1-D tensors, norms and the position
    embedding stay float32 (convert_hf_to_gguf.py); in a 4-bit file the output head is q8_0, the
    nearest the gguf package writes to llama-quantize's Q6_K for it; the rest take `kind`."""
    if dims < 2 or name.endswith("_norm.weight") or name.startswith("position_embd"):
        return "float32"
    if kind == "q4_0" and name == "output.weight":
        return "q8_0"
    return kind


def _tensors(model: GPT2LMHeadModel, kind: str):
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
        yield (name, *_encoded(name, tensor.contiguous(), tensor_kind(name, tensor.dim(), kind)))


def _encoded(name: str, tensor: torch.Tensor, kind: str) -> tuple[np.ndarray, object]:
    import gguf

    if kind in QUANTIZED:
        qtype = getattr(gguf.GGMLQuantizationType, kind.upper())
        try:
            return gguf.quants.quantize(tensor.float().numpy(), qtype), qtype
        except gguf.QuantError as error:  # a row the block size does not divide
            log.warning("%s: %s; written as float16, as llama.cpp's converter does", name, error)
            kind = "float16"
    if kind == "bfloat16":  # numpy has no bfloat16: its raw 16 bits, typed for the writer
        return tensor.to(torch.bfloat16).view(torch.int16).numpy(), gguf.GGMLQuantizationType.BF16
    return tensor.to(getattr(torch, kind)).numpy(), None


def can_measure() -> bool:
    """llama-cpp-python is installed (it builds llama.cpp itself)."""
    return importlib.util.find_spec("llama_cpp") is not None


def measure(path: Path, blocks: np.ndarray, generated: int = 128) -> dict:
    """llama.cpp's own reading of the GGUF `path` (llama-cpp-python): the perplexity of held-out
    `blocks` as the notebook's validation counts it ((n, T+1) tokens, every target scored after the
    tokens before it in its block; or conversations' (n, 2, T+1) tokens and labels, the answers'
    targets only), the file's size, and the tokens/s of greedy generation on this machine."""
    from llama_cpp import Llama

    tokens, labels = (blocks[:, 0], blocks[:, 1]) if blocks.ndim == 3 else (blocks, blocks)
    context = tokens.shape[1] - 1
    with contextlib.closing(Llama(str(path), n_ctx=context, logits_all=True, verbose=False)) as llm:
        loss, counted = 0.0, 0
        for block, label in zip(tokens, labels):
            llm.reset()
            llm.eval(block[:-1].tolist())
            scored = np.flatnonzero(label[1:] != IGNORE_INDEX)
            logits = torch.from_numpy(np.asarray(llm.scores[:context])[scored].astype(np.float64))  # scored rows only
            loss += F.cross_entropy(logits, torch.from_numpy(label[1:][scored]).long(), reduction="sum").item()
            counted += len(scored)
        if counted == 0:
            raise ValueError("no target of these blocks carries loss (conversations whose answers fall outside them)")
        prompt = tokens[0][:max(1, min(8, context // 2))].tolist()
        wanted, produced = min(generated, context - len(prompt)), 0
        started = time.perf_counter()
        for _ in llm.generate(prompt, temp=0.0):  # greedy, so every run times the same tokens
            produced += 1
            if produced >= wanted:
                break
        seconds = time.perf_counter() - started
    return {"perplexity": perplexity(loss / counted), "bytes": Path(path).stat().st_size,
            "tokens_per_second": produced / seconds, "blocks": len(blocks),
            "scored": "answers" if blocks.ndim == 3 else "every token"}


def write_into(model_dir: Path, kind: str, held_out: np.ndarray | None = None) -> Path:
    """The export's GGUF: `model_dir/model.gguf` in `kind`. With `held_out` blocks and
    llama-cpp-python installed, llama.cpp's measure of each type (`compare`) goes into
    `model_dir/gguf_types.json`. The model is read from `model_dir` once for all of it."""
    source = _read(model_dir)
    path = _write(source, Path(model_dir) / GGUF, kind)
    rows = compare(model_dir, held_out, written={kind: path}, source=source) if (
        held_out is not None and can_measure()) else []
    if rows:
        files.write_json(Path(model_dir) / TYPES_MEASURED, {"exported": kind, "rows": rows})
    return path


def compare(model_dir: Path, blocks: np.ndarray, kinds: tuple[str, ...] = ("float16", "q8_0", "q4_0"),
            written: dict[str, Path] | None = None, source=None) -> list[dict]:
    """Each kind read by llama.cpp (`measure`): the file `written` holds for it, or one written
    aside from `model_dir` (read once, unless `source` is what `_read` gave). One row per kind;
    none, with a warning, where llama.cpp could not measure (the measure is optional, the export
    is not)."""
    rows, written = [], written or {}
    try:
        with tempfile.TemporaryDirectory(prefix="nblib-gguf-") as scratch:
            for kind in kinds:
                path = written.get(kind)
                if path is None:
                    source = source or _read(model_dir)
                    path = _write(source, Path(scratch) / f"{kind}.gguf", kind)
                rows.append({"type": kind, **measure(path, blocks)})
    except Exception as error:  # noqa: BLE001 (llama-cpp-python's failures have no common type)
        log.warning("llama.cpp's measure of the GGUF types was skipped: %s: %s", type(error).__name__, error)
        return []
    log.info("llama.cpp's perplexity on %d held-out blocks: %s", len(blocks),
             ", ".join(f"{r['type']} {r['perplexity']:.3f} ({size(r['bytes'])})" for r in rows))
    return rows


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
    parser.add_argument("--type", "--dtype", choices=tuple(FILE_TYPES), default="float32", dest="kind",
                        help="the matrices' type: a float, or quantized (q8_0, q4_0)")
    args = parser.parse_args(argv)
    print(write(args.model, args.out or args.model / "model.gguf", args.kind))


if __name__ == "__main__":
    main()
