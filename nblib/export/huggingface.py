"""The deliverable: `final_model/` in Hugging Face format, loadable by `pipeline("text-generation")`."""
from __future__ import annotations

import contextlib
import copy
import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from nblib import console, files, history
from nblib.export import generate, gguf_file, publish
from nblib.model import gpt2, lora
from nblib.model.gpt2 import weights_are_finite
from nblib.setup.config import RunConfig, SamplingConfig
from nblib.training import checkpoint

log = logging.getLogger(__name__)

FINAL_MODEL = "final_model"
LEGACY_GGUF = "final_model.gguf"  # beside it, where earlier versions wrote it (removed at export)


def load_best_weights(model: PreTrainedModel, run_dir: Path) -> bool:
    """Put `best_model.pt`'s weights into `model`; False (weights unchanged) when there is none."""
    best = Path(run_dir) / checkpoint.BEST_MODEL
    if not best.is_file():
        return False
    gpt2.load_weights(model, checkpoint.load(best))
    return True


def final_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, run_dir: Path,
                sampling: SamplingConfig | None = None, lora_export: str = "merged",
                export_dtype: str = "float32", export_gguf: bool = False, gguf_type: str = "",
                held_out: np.ndarray | None = None, extra: Callable[[Path], None] | None = None) -> Path:
    """Write model (safetensors), config, generation config and tokenizer to `run_dir/final_model`.

    The generation config carries `sampling`'s settings, so `pipeline("text-generation")` samples
    as the notebook did. A LoRA model is exported merged into a plain GPT2LMHeadModel, or as the
    adapter alone (`lora_export="adapter"`, loaded with peft's AutoPeftModelForCausalLM). The
    weights are saved in `export_dtype` ("float32", "float16" or "bfloat16"; an adapter stays as
    trained), `model` itself untouched. With `export_gguf`, `model.gguf` is written in it for
    llama.cpp, in `gguf_type` ("q8_0", "q4_0") or else the same dtype; with `held_out` token
    blocks and llama-cpp-python installed, llama.cpp's perplexity, size and speed of each GGUF
    type are measured into `gguf_types.json`. `extra(directory)` adds what else belongs (the model
    card). The
    directory is filled aside and swapped in whole: an export is complete, or the previous one
    (a kill mid-export keeps that), and what an export does not write is gone with the old one.

    Raises:
        ValueError: the weights hold NaN or infinity (nothing is written).
    """
    if not weights_are_finite(model):
        raise ValueError("refusing to export: the model's weights are not finite; load "
                         "best_model.pt (export.load_best_weights) or resume from a checkpoint")
    if lora.is_lora(model):
        exported = lora.merged(model) if lora_export == "merged" else model
    else:
        exported = gpt2.unpadded(model)  # the tokenizer's vocabulary, not the padded rows
    if export_dtype != "float32" and not (exported is model and lora.is_lora(model)):
        exported = (copy.deepcopy(exported) if exported is model else exported).to(getattr(torch, export_dtype))
    generation = generate.generation_config(sampling or SamplingConfig(prompts=()), tokenizer, model.config)

    def fill(directory: Path) -> None:
        with _quiet_transformers():
            exported.save_pretrained(str(directory))
        generation.save_pretrained(str(directory))
        save_portable_tokenizer(tokenizer, directory, model.config.n_positions)
        if export_gguf:
            with _quiet_transformers():  # the GGUF writer reads the model back: no "Loading weights" bar
                gguf_file.write_into(directory, gguf_type or export_dtype, held_out)
        if extra is not None:
            extra(directory)

    path = files.atomic_directory(Path(run_dir) / FINAL_MODEL, fill)
    (Path(run_dir) / LEGACY_GGUF).unlink(missing_ok=True)  # an older export's, which this one replaces
    if exported is model and lora.is_lora(model):
        log.info("the LoRA adapter alone is exported (lora_export='adapter')")
    return path


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' own progress bars ("Writing model shards", "Loading weights") off for a small
    model's save and read."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def final_model_of_run(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, cfg: RunConfig,
                       chat: bool = False, held_out: np.ndarray | None = None) -> Path:
    """The notebook's export: `final_model` with the run's settings and its model card (`chat`: the
    run trained on conversations; `held_out`: token blocks for llama.cpp's measure of the GGUF
    types, see `final_model`)."""
    return final_model(model, tokenizer, cfg.output_dir, cfg.sampling, cfg.lora_export, cfg.export_dtype,
                       cfg.export_gguf, cfg.gguf_kind, held_out,
                       extra=lambda directory: publish.write_card(directory, cfg, chat))


def save_portable_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: Path, n_positions: int) -> None:
    """`save_pretrained`, loadable by transformers 4.x and 5.x alike.

    transformers 5 writes `"tokenizer_class": "TokenizersBackend"` and no vocab.json/merges.txt,
    which 4.x's AutoTokenizer and GPT2Tokenizer (the guide's snippet) cannot load. A GPT-2-style
    byte-level BPE is saved as a GPT2Tokenizer with both files, which every version reads; and
    `model_max_length` is the model's context, not 1e6.
    """
    tokenizer.save_pretrained(str(directory))
    settings_file = Path(directory) / "tokenizer_config.json"
    settings = json.loads(settings_file.read_text())
    settings["model_max_length"] = n_positions
    if _is_byte_level_bpe(tokenizer):
        tokenizer.backend_tokenizer.model.save(str(directory))  # vocab.json and merges.txt
        settings["tokenizer_class"] = "GPT2Tokenizer"
    settings_file.write_text(json.dumps(settings, indent=2))


def _is_byte_level_bpe(tokenizer: PreTrainedTokenizerFast) -> bool:
    """GPT-2's own layout, which GPT2Tokenizer reproduces: a BPE after a plain ByteLevel split."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    pre = spec.get("pre_tokenizer") or {}
    return (spec["model"]["type"] == "BPE" and pre.get("type") == "ByteLevel"
            and not pre.get("add_prefix_space", False))


def summary(run_dir: Path) -> str:
    """The run's outputs with their sizes, and how to load the model."""
    run_dir = Path(run_dir)
    lines = [f"outputs in {run_dir}:"]
    for path in sorted(run_dir.rglob("*")):
        if path.is_file() and "data_cache" not in path.parts and not path.name.startswith("."):
            lines.append(f"  {path.relative_to(run_dir)}  {console.size(path.stat().st_size)}")
    if (run_dir / FINAL_MODEL).is_dir():
        lines.append(f'load it: transformers.pipeline("text-generation", model="{run_dir / FINAL_MODEL}")')
    last = (history.read(run_dir) or [None])[-1]
    if last is not None and last.hellaswag_accuracy is not None:
        lines.append(f"HellaSwag ({last.hellaswag_source}, {last.hellaswag_items:,} items): accuracy "
                     f"{last.hellaswag_accuracy:.4f} (summed log-likelihood: {last.hellaswag_sum_accuracy:.4f})")
    return "\n".join(lines)
