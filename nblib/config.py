"""The run configuration's schema and presets, and the rules a resolved configuration must keep.

`params.resolve` turns the notebook's parameters into a RunConfig and checks it here."""
from __future__ import annotations

import dataclasses
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import paths

PRESETS = ("kaggle-t4", "cpu-demo", "smoke")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
REPORTERS = ("none", "tensorboard", "wandb")
LORA_EXPORTS = ("merged", "adapter")
EXPORT_DTYPES = ("float32", "float16", "bfloat16")
DATA_FORMATS = ("auto", "text", "chat")
TRAIN_ON = ("responses", "all")
SCRATCH = "scratch"
BUILTIN_DATASETS = ("builtin:python-docs",)
GPT2_VOCAB_SIZE = 50257
GPT2_TOKENIZER = "openai-community/gpt2"  # the Hub's canonical id; "gpt2" is its legacy alias
GPT2_TOKENIZERS = (GPT2_TOKENIZER, "gpt2")
BPE_SPEC = re.compile(r"^bpe:(\d+)$")  # a byte-level BPE trained on the training split


@dataclass(frozen=True)
class DataConfig:
    dataset: str  # Hub id, local path/glob, save_to_disk dir or builtin:python-docs
    dataset_config: str  # Hub configuration name, "" for none
    text_column: str  # column that holds the text
    tokenizer: str  # "openai-community/gpt2" (or "gpt2"), "bpe:<vocab size>" or a saved tokenizer directory
    stride: int | None = None  # tokens between block starts; None: max_length + 1 (disjoint)
    drop_remainder: bool = True  # False: a last block ends at the stream's end
    token_key: str = ""  # pre-tokenized JSONL: the key of the id lists ("": input_ids or tokens)
    data_format: str = "auto"  # "text", "chat" (conversations), "auto": chat where a messages column is
    train_on: str = "responses"  # chat: "responses" (the assistant's tokens carry the loss) or "all"
    instruction_column: str = "instruction"  # chat from two columns: the user's turn ...
    response_column: str = "response"  # ... and the assistant's answer


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int | None  # None: the tokenizer's size
    n_positions: int  # longest context the model can see
    n_embd: int  # width of the residual stream
    n_layer: int  # transformer blocks
    n_head: int  # attention heads per block
    n_inner: int  # hidden width of each MLP
    dropout: float  # residual, embedding and attention dropout
    init_from: str = SCRATCH  # "scratch", a Hub model id or a local Hugging Face directory
    lora_r: int = 0  # LoRA rank; 0: train every weight
    lora_alpha: float = 16.0  # LoRA scaling (alpha / r)
    lora_dropout: float = 0.05  # dropout on the LoRA path
    lora_target_modules: tuple[str, ...] = ("c_attn",)  # GPT-2 modules that get adapters


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int  # micro-batch: blocks per forward pass
    gradient_accumulation_steps: int  # micro-batches per optimizer step
    learning_rate: float  # peak learning rate after warm-up
    weight_decay: float  # AdamW decay on matrices only
    max_grad_norm: float  # gradient clipping threshold
    epochs: int  # passes over the training blocks (when max_steps is 0)
    max_steps: int  # optimizer steps; 0 derives them from epochs
    warmup_steps: int  # linear warm-up before cosine decay
    max_length: int  # tokens per training block (context length)
    save_steps: int  # checkpoint every this many optimizer steps
    eval_steps: int  # evaluate every this many optimizer steps
    max_checkpoints: int  # most recent checkpoints kept
    precision: str  # auto, fp32, fp16 or bf16
    seed: int  # seeds weights, data order and dropout
    time_budget_minutes: float  # stop, save and export before this; 0: no budget
    max_bad_steps: int = 10  # consecutive non-finite losses before the run stops
    torch_compile: bool = False  # torch.compile the forward pass (CUDA >= 7.0; gains nothing on CPU)
    eval_blocks: int = 400  # validation blocks per evaluation: the same first blocks every time

    @property
    def global_batch(self) -> int:
        """Blocks per optimizer step, over all processes: the number of GPUs shares it out."""
        return self.batch_size * self.gradient_accumulation_steps

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.max_length


@dataclass(frozen=True)
class SamplingConfig:
    prompts: tuple[str, ...]  # continued after training, and at each evaluation
    max_new_tokens: int = 60
    temperature: float = 0.8  # below 1 sharper, above 1 more random
    top_k: int = 50  # sample among the k likeliest tokens; 0: no limit
    top_p: float = 0.95  # ... and among the fewest whose probabilities reach p
    repetition_penalty: float = 1.0  # above 1 discourages repeating tokens
    num_return_sequences: int = 1  # samples per prompt
    seed: int = 0  # the same seed gives the same samples


@dataclass(frozen=True)
class RunConfig:
    preset: str
    output_dir: Path
    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    resume_from_checkpoint: str  # "", a checkpoint path, or "auto"
    dry_run: bool  # print the resolved config and stop
    sampling: SamplingConfig = SamplingConfig(prompts=())
    devices: str | int = "auto"  # processes for data-parallel training: "auto" (every GPU) or a count
    report_to: str = "none"  # "none", "tensorboard" or "wandb"
    lora_export: str = "merged"  # final_model of a LoRA run: "merged" weights or the "adapter" alone
    export_dtype: str = "float32"  # final_model's weights: float32, float16 or bfloat16
    export_gguf: bool = False  # also write final_model/model.gguf, for llama.cpp (needs the gguf package)
    upload_to: str = ""  # a Kaggle Models handle owner/model/framework/variation: final_model/ is uploaded
    eval_hellaswag: str = ""  # after training: "" none, "hub" (Rowan/hellaswag) or a HellaSwag JSONL file
    hellaswag_items: int = 0  # HellaSwag items scored: 0 all, else the first this many
    sample_from: str = ""  # the generate cell's model: "" the one just trained, a directory or a .pt
    started_at: float = field(default_factory=paths.session_started_at)  # the time budget counts from it

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (stored in checkpoints and beside the run)."""
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))

    def to_json(self) -> str:
        """The fully resolved config as JSON (`python -m nblib.job --show-config`)."""
        return json.dumps(self.to_dict(), indent=2)

    def describe(self) -> str:
        """Readable multi-line summary for the notebook (the global batch: collectives.describe)."""
        lines = [f"preset {self.preset}, output_dir {self.output_dir}"]
        for name, part in (("data", self.data), ("model", self.model), ("train", self.train),
                           ("sampling", self.sampling)):
            items = ", ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(part).items())
            lines.append(f"{name}: {items}")
        lines.append(f"resume_from_checkpoint={self.resume_from_checkpoint!r}, devices={self.devices!r}, "
                     f"report_to={self.report_to!r}, lora_export={self.lora_export!r}, "
                     f"export_dtype={self.export_dtype!r}, export_gguf={self.export_gguf}, "
                     f"upload_to={self.upload_to!r}, "
                     f"sample_from={self.sample_from!r}, eval_hellaswag={self.eval_hellaswag!r}, "
                     f"hellaswag_items={self.hellaswag_items}, dry_run={self.dry_run}")
        began = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started_at))
        lines.append(f"the time budget counts from {began} (the session's start)")
        return "\n".join(lines)


# Every preset names every value, so `None` in the notebook always has a meaning.
PRESET_VALUES: dict[str, dict[str, Any]] = {
    # The Kaggle training guide's CONFIG, on WikiText-103 with the GPT-2 tokenizer.
    "kaggle-t4": dict(
        dataset="Salesforce/wikitext", dataset_config="wikitext-103-raw-v1", tokenizer=GPT2_TOKENIZER,
        vocab_size=GPT2_VOCAB_SIZE, n_positions=512, n_embd=256, n_layer=8, n_head=8, n_inner=1024,
        dropout=0.0, batch_size=8, gradient_accumulation_steps=8, learning_rate=5e-4, weight_decay=0.01,
        max_grad_norm=1.0, epochs=3, max_steps=0, warmup_steps=500, max_length=512,
        save_steps=1000, eval_steps=500, max_checkpoints=4, eval_blocks=800,
        time_budget_minutes=660,  # 11 h: Kaggle kills GPU sessions at 12 h
        prompts=("The history of", "In 1998 , the"),
    ),
    # About ten minutes on a 2-core CPU, on the offline built-in corpus.
    "cpu-demo": dict(
        dataset="builtin:python-docs", dataset_config="", tokenizer="bpe:4096",
        vocab_size=None, n_positions=256, n_embd=256, n_layer=4, n_head=4, n_inner=1024,
        dropout=0.0, batch_size=8, gradient_accumulation_steps=2, learning_rate=2e-3, weight_decay=0.1,
        max_grad_norm=1.0, epochs=1, max_steps=1200, warmup_steps=50, max_length=128,
        save_steps=200, eval_steps=100, max_checkpoints=4, eval_blocks=160, time_budget_minutes=0,
        prompts=("Return the", "The default value", "This module provides"),
    ),
    # Seconds, for CI: a tiny model on a tiny tokenizer, a few dozen steps.
    "smoke": dict(
        dataset="builtin:python-docs", dataset_config="", tokenizer="bpe:512",
        vocab_size=None, n_positions=64, n_embd=64, n_layer=2, n_head=2, n_inner=256,
        dropout=0.0, batch_size=8, gradient_accumulation_steps=2, learning_rate=3e-3, weight_decay=0.01,
        max_grad_norm=1.0, epochs=1, max_steps=40, warmup_steps=5, max_length=64,
        save_steps=10, eval_steps=10, max_checkpoints=2, eval_blocks=32, time_budget_minutes=0,
        prompts=("Return the",),
    ),
}


def validate(cfg: RunConfig) -> list[str]:
    """Every problem with a resolved config, as 'name=value: what is allowed' lines: the rules
    that need nothing but the values (what the values name is probed by `params.resolve`)."""
    m, t, d = cfg.model, cfg.train, cfg.data
    problems = []
    positive = dict(n_positions=m.n_positions, n_embd=m.n_embd, n_layer=m.n_layer,
                    n_head=m.n_head, n_inner=m.n_inner, batch_size=t.batch_size,
                    gradient_accumulation_steps=t.gradient_accumulation_steps,
                    epochs=t.epochs, max_length=t.max_length, save_steps=t.save_steps,
                    eval_steps=t.eval_steps, eval_blocks=t.eval_blocks, max_checkpoints=t.max_checkpoints,
                    max_bad_steps=t.max_bad_steps,
                    learning_rate=t.learning_rate, max_grad_norm=t.max_grad_norm)
    problems += [f"{k}={v!r}: must be > 0" for k, v in positive.items() if v <= 0]
    non_negative = dict(max_steps=t.max_steps, warmup_steps=t.warmup_steps,
                        weight_decay=t.weight_decay, seed=t.seed,
                        time_budget_minutes=t.time_budget_minutes)
    problems += [f"{k}={v!r}: must be >= 0" for k, v in non_negative.items() if v < 0]
    if not 0 <= m.dropout < 1:
        problems.append(f"dropout={m.dropout!r}: must be in [0, 1)")
    if d.data_format not in DATA_FORMATS:
        problems.append(f"data_format={d.data_format!r}: must be one of {', '.join(DATA_FORMATS)}")
    if d.train_on not in TRAIN_ON:
        problems.append(f"train_on={d.train_on!r}: must be one of {', '.join(TRAIN_ON)}")
    if d.stride is not None and d.stride <= 0:
        problems.append(f"stride={d.stride!r}: must be > 0 (or None for disjoint blocks)")
    if m.n_head > 0 and m.n_embd % m.n_head:
        problems.append(f"n_embd={m.n_embd!r}: must be divisible by n_head={m.n_head}")
    if t.max_length > m.n_positions:
        problems.append(f"max_length={t.max_length!r}: must be <= n_positions={m.n_positions}")
    if cfg.devices != "auto" and (isinstance(cfg.devices, str) or cfg.devices < 1):
        problems.append(f"devices={cfg.devices!r}: must be 'auto' (every GPU) or a number of processes >= 1")
    if t.precision not in PRECISIONS:
        problems.append(f"precision={t.precision!r}: must be one of {', '.join(PRECISIONS)}")
    problems += _validate_sampling(cfg.sampling)
    if cfg.report_to not in REPORTERS:
        problems.append(f"report_to={cfg.report_to!r}: must be one of {', '.join(REPORTERS)}")
    problems += _validate_lora(cfg)
    return problems


def _validate_sampling(g: SamplingConfig) -> list[str]:
    problems = [f"{k}={v!r}: must be > 0" for k, v in dict(
        max_new_tokens=g.max_new_tokens, temperature=g.temperature,
        repetition_penalty=g.repetition_penalty, num_return_sequences=g.num_return_sequences).items()
        if v <= 0]
    if g.top_k < 0:
        problems.append(f"top_k={g.top_k!r}: must be >= 0 (0: no limit)")
    if not 0 < g.top_p <= 1:
        problems.append(f"top_p={g.top_p!r}: must be in (0, 1]")
    return problems


def _validate_lora(cfg: RunConfig) -> list[str]:
    m = cfg.model
    problems = []
    if cfg.lora_export not in LORA_EXPORTS:
        problems.append(f"lora_export={cfg.lora_export!r}: must be one of {', '.join(LORA_EXPORTS)}")
    if cfg.hellaswag_items < 0:
        problems.append(f"hellaswag_items={cfg.hellaswag_items}: must be 0 (every item) or more")
    if cfg.export_dtype not in EXPORT_DTYPES:
        problems.append(f"export_dtype={cfg.export_dtype!r}: must be one of {', '.join(EXPORT_DTYPES)}")
    if m.lora_r < 0:
        problems.append(f"lora_r={m.lora_r!r}: must be >= 0 (0: no LoRA)")
    if m.lora_r <= 0:
        return problems
    if cfg.export_gguf and cfg.lora_export == "adapter":
        problems.append("export_gguf=True: GGUF holds a whole model, and lora_export='adapter' exports the "
                        "adapter alone; use lora_export='merged' or export_gguf=False")
    if m.init_from == SCRATCH:
        problems.append(f"lora_r={m.lora_r}: LoRA adapts a pretrained model; set init_from to a "
                        "Hub id or a local model directory, or lora_r=0")
    if not m.lora_target_modules:
        problems.append("lora_target_modules='': name at least one module, e.g. 'c_attn' or "
                        "'c_attn,c_proj,c_fc'")
    if not 0 <= m.lora_dropout < 1:
        problems.append(f"lora_dropout={m.lora_dropout!r}: must be in [0, 1)")
    return problems
