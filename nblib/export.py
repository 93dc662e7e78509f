"""The deliverable: `final_model/` in Hugging Face format, loadable by `pipeline("text-generation")`."""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from . import checkpoint, files, generate, gguf_export, lora, publish
from . import model as model_weights
from .config import RunConfig, SamplingConfig
from .evaluation import read_history
from .model import weights_are_finite

log = logging.getLogger(__name__)

FINAL_MODEL = "final_model"
FINAL_GGUF = "final_model.gguf"


def load_best_weights(model: PreTrainedModel, run_dir: Path) -> bool:
    """Put `best_model.pt`'s weights into `model`; False (weights unchanged) when there is none."""
    best = Path(run_dir) / checkpoint.BEST_MODEL
    if not best.is_file():
        return False
    model_weights.load_weights(model, checkpoint.load(best))
    return True


def final_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, run_dir: Path,
                sampling: SamplingConfig | None = None, lora_export: str = "merged",
                export_dtype: str = "float32", export_gguf: bool = False) -> Path:
    """Write model (safetensors), config, generation config and tokenizer to `run_dir/final_model`.

    The generation config carries `sampling`'s settings, so `pipeline("text-generation")` samples
    as the notebook did. A LoRA model is exported merged into a plain GPT2LMHeadModel, or as the
    adapter alone (`lora_export="adapter"`, loaded with peft's AutoPeftModelForCausalLM). The
    weights are saved in `export_dtype` ("float32", "float16" or "bfloat16"; an adapter stays as
    trained), `model` itself untouched. The directory is swapped in whole, so a kill mid-export
    keeps the previous export. With `export_gguf`, `final_model.gguf` is written beside it, in
    the same dtype, for llama.cpp.

    Raises:
        ValueError: the weights hold NaN or infinity (nothing is written).
    """
    if not weights_are_finite(model):
        raise ValueError("refusing to export: the model's weights are not finite; load "
                         "best_model.pt (export.load_best_weights) or resume from a checkpoint")
    if lora.is_lora(model):
        exported = lora.merged(model) if lora_export == "merged" else model
    else:
        exported = model_weights.unpadded(model)  # the tokenizer's vocabulary, not the padded rows
    if export_dtype != "float32" and not (exported is model and lora.is_lora(model)):
        exported = (copy.deepcopy(exported) if exported is model else exported).to(getattr(torch, export_dtype))
    generation = generate.generation_config(sampling or SamplingConfig(prompts=()), tokenizer, model.config)

    def fill(directory: Path) -> None:
        exported.save_pretrained(str(directory))
        generation.save_pretrained(str(directory))
        save_portable_tokenizer(tokenizer, directory, model.config.n_positions)

    path = files.atomic_directory(Path(run_dir) / FINAL_MODEL, fill)
    log.info("exported %s%s", path, " (LoRA adapter only)" if exported is model and lora.is_lora(model) else "")
    if export_gguf:
        gguf_export.write(path, Path(run_dir) / FINAL_GGUF, export_dtype)
    return path


def final_model_of_run(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, cfg: RunConfig) -> Path:
    """The notebook's export: `final_model` with the run's settings, then its model card."""
    path = final_model(model, tokenizer, cfg.output_dir, cfg.sampling, cfg.lora_export, cfg.export_dtype,
                       cfg.export_gguf)
    publish.write_card(path, cfg, chat=bool(getattr(tokenizer, "chat_template", None)))
    return path


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
            lines.append(f"  {path.relative_to(run_dir)}  {path.stat().st_size / 2**20:.2f} MB")
    lines.append(f'load it: transformers.pipeline("text-generation", model="{run_dir / FINAL_MODEL}")')
    last = (read_history(run_dir) or [{}])[-1]
    if "hellaswag_accuracy" in last:
        lines.append(f"HellaSwag ({last['hellaswag_source']}, {last['hellaswag_items']:,} items): accuracy "
                     f"{last['hellaswag_accuracy']:.4f} (summed log-likelihood: {last['hellaswag_sum_accuracy']:.4f})")
    return "\n".join(lines)
