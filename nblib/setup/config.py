"""The run configuration, with each notebook parameter declared once: as a field of one of these
dataclasses, whose `param(...)` holds its default or per-preset values, its help, what a resumed
run does when it changes, and the check its value needs alone.

`params` derives the parameter table from these fields (the boundary's defaults and types, the
presets, the resume contract's rules, the value checks and docs/parameters.md); `params.resolve`
turns the notebook's parameters into a RunConfig and `validate` checks the rules that join two
values.
"""
from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nblib.console import moment
from nblib.setup import paths

PRESETS = ("kaggle-t4", "cpu-demo", "smoke")
NEEDS_BUDGET = "fit_to_budget=True needs a time budget: set time_budget_minutes (e.g. 600 on Kaggle)"
SCRATCH = "scratch"
BUILTIN_DATASETS = ("builtin:python-docs",)
GPT2_VOCAB_SIZE = 50257
GPT2_TOKENIZER = "openai-community/gpt2"  # the Hub's canonical id; "gpt2" is its legacy alias
GPT2_TOKENIZERS = (GPT2_TOKENIZER, "gpt2")
BPE_SPEC = re.compile(r"^bpe:(\d+)$")  # a byte-level BPE trained on the training split
GPU_PRESETS = {"kaggle-t4": 120_000_000}  # presets meant for a GPU: their dataset's training tokens an epoch

# What a resumed run does when a parameter changes (the resume contract, docs/resume-contract.md).
IDENTITY = "identity"  # in the fingerprint: a resume must match it
BOUND = "bound"  # fixed when the run starts: a resume must match it
APPLIED = "may change"  # applied to the resumed run, logged and recorded
FREE = "free"  # how this session runs, not part of the run: never compared
_BY_TOKENS = "compared through the tokens they make (the same tokens from another path resume)"
_SHAPE = "the model's shape"
_BLOCKS = "how the tokens are cut into blocks"
_NEXT_STEP = "from the next step"
_SCHEDULE = "the schedule is derived again, from the resumed step"
_SAMPLES = "the samples from the next evaluation"
_SESSION = "where and how this session runs"


# The checks a value needs alone; each gives the problem or None.
def positive(name: str, value) -> str | None:
    return f"{name}={value!r}: must be > 0" if value is not None and value <= 0 else None


def non_negative(name: str, value) -> str | None:
    return f"{name}={value!r}: must be >= 0" if value < 0 else None


def fraction(name: str, value) -> str | None:
    return f"{name}={value!r}: must be in [0, 1)" if not 0 <= value < 1 else None


def one_of(*choices: str) -> Callable[[str, Any], str | None]:
    allowed = ", ".join(choice or '""' for choice in choices)

    def check(name: str, value) -> str | None:
        return f"{name}={value!r}: must be one of {allowed}" if value not in choices else None
    return check


def param(default: Any = None, *, help: str, resume: str, why: str = "", presets: tuple | None = None,
          check: Callable[[str, Any], str | None] | None = None, group: str = "", name: str = "",
          notebook: Any = None) -> Any:
    """A notebook parameter. `default`: its value in the notebook, None meaning "the preset's",
    which `presets` then gives, one per preset in PRESETS order. `help`: one line. `resume`,
    `why`: its rule in the resume contract. `check`: what its value alone must satisfy.
    `group`: its heading in the notebook and the docs, where not its section's. `name`: its
    name in the notebook, where not the field's. `notebook`: its type there, where not the
    field's (None allowed when the default is None)."""
    return field(default=default, metadata=dict(
        help=help, resume=resume, why=why or {FREE: _SESSION}.get(resume, ""), check=check, group=group,
        name=name, notebook=notebook, presets=dict(zip(PRESETS, presets)) if presets else None))


@dataclass(frozen=True)
class DataConfig:
    dataset: str = param(help="Hub id, save_to_disk directory, .txt/.jsonl/.parquet files or glob, or "
                              "builtin:python-docs", resume=IDENTITY, why=_BY_TOKENS,
                         presets=("Salesforce/wikitext", "builtin:python-docs", "builtin:python-docs"))
    dataset_config: str = param(help='Hub configuration, e.g. wikitext-103-raw-v1; "" for none', resume=IDENTITY,
                                why=_BY_TOKENS, presets=("wikitext-103-raw-v1", "", ""))
    text_column: str = param("text", help="the column that holds the text", resume=IDENTITY, why=_BY_TOKENS)
    tokenizer: str = param(help='"openai-community/gpt2", "bpe:<vocab size>" (trained here) or a saved '
                                "tokenizer directory", resume=IDENTITY,
                           why="compared through its vocabulary and merges, not its name",
                           presets=(GPT2_TOKENIZER, "bpe:4096", "bpe:512"))
    stride: int | None = param(help="tokens between block starts; below max_length + 1 the blocks overlap; "
                                       "None: disjoint blocks", resume=IDENTITY, why=_BLOCKS, check=positive)
    drop_remainder: bool = param(True, help="False: keep one last block that ends at the end of the data",
                                 resume=IDENTITY, why=_BLOCKS)
    token_key: str = param("", help="pre-tokenized JSONL: the key of the token-id lists; empty: input_ids or "
                                    "tokens", resume=IDENTITY, why=_BY_TOKENS)
    data_format: str = param("auto", help='"text", "chat" (conversations) or "auto": chat where a messages '
                                          "column is", resume=IDENTITY, why=_BY_TOKENS,
                             check=one_of("auto", "text", "chat"))
    train_on: str = param("responses", help='chat: "responses" (only the assistant\'s tokens carry loss) or "all"',
                          resume=IDENTITY, why=_BY_TOKENS, check=one_of("responses", "all"))
    instruction_column: str = param("instruction", help="chat without a messages column: the user's turn",
                                    resume=IDENTITY, why=_BY_TOKENS)
    response_column: str = param("response", help="... and the assistant's answer", resume=IDENTITY,
                                 why=_BY_TOKENS)


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int | None = param(help="None: the tokenizer's size; larger pads the embedding",
                                      resume=IDENTITY, why=_SHAPE, check=positive,
                                      presets=(GPT2_VOCAB_SIZE, None, None))
    n_positions: int = param(help="the longest context the model can see", resume=IDENTITY, why=_SHAPE,
                             check=positive, presets=(512, 256, 64))
    n_embd: int = param(help="embedding width, a multiple of n_head", resume=IDENTITY, why=_SHAPE,
                        check=positive, presets=(256, 256, 64))
    n_layer: int = param(help="transformer blocks", resume=IDENTITY, why=_SHAPE, check=positive,
                         presets=(8, 4, 2))
    n_head: int = param(help="attention heads per block", resume=IDENTITY, why=_SHAPE, check=positive,
                        presets=(8, 4, 2))
    n_inner: int = param(help="MLP hidden width", resume=IDENTITY, why=_SHAPE, check=positive,
                         presets=(1024, 1024, 256))
    dropout: float = param(help="residual, embedding and attention dropout (0 for long pretraining)",
                           resume=APPLIED, why=_NEXT_STEP, check=fraction, presets=(0.0, 0.0, 0.0))
    init_from: str = param(SCRATCH, help='"scratch", a Hub id ("openai-community/gpt2", "distilbert/distilgpt2"; '
                                         "Internet on) or a local Hugging Face model directory",
                           resume=IDENTITY, why=_SHAPE, group="Fine-tuning")
    lora_r: int = param(0, help="LoRA rank (needs the peft package); 0 trains every weight", resume=IDENTITY,
                        why=_SHAPE, check=non_negative, group="Fine-tuning")
    lora_alpha: float = param(16.0, help="LoRA scaling: the adapters' update is multiplied by alpha / r",
                              resume=IDENTITY, why=_SHAPE, group="Fine-tuning")
    lora_dropout: float = param(0.05, help="dropout on the LoRA path", resume=APPLIED, why=_NEXT_STEP,
                                check=fraction, group="Fine-tuning")
    lora_target_modules: tuple[str, ...] = param(("c_attn",), help='comma-separated GPT-2 modules that get '
                                                                   'adapters, e.g. "c_attn,c_proj,c_fc"',
                                                 resume=IDENTITY, why=_SHAPE, group="Fine-tuning", notebook=str)


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = param(help="blocks per forward pass (micro-batch)", resume=APPLIED,
                            why="a new split of the same global batch", check=positive, presets=(8, 8, 8))
    gradient_accumulation_steps: int = param(help="micro-batches per optimizer step", resume=APPLIED,
                                             why="a new split of the same global batch", check=positive,
                                             presets=(8, 2, 2))
    learning_rate: float = param(help="peak learning rate after warm-up", resume=APPLIED,
                                 why="set in the optimizer and as the schedule's peak", check=positive,
                                 presets=(5e-4, 2e-3, 3e-3))
    weight_decay: float = param(help="AdamW weight decay, on matrices only", resume=APPLIED,
                                why="set in the optimizer (weight matrices only)", check=non_negative,
                                presets=(0.01, 0.1, 0.01))
    max_grad_norm: float = param(help="gradient clipping threshold", resume=APPLIED, why="clips from the next step",
                                 check=positive, presets=(1.0, 1.0, 1.0))
    epochs: int = param(help="passes over the data, used when max_steps is 0 (with fit_to_budget: the most)",
                        resume=APPLIED, why=_SCHEDULE, check=positive, presets=(3, 20, 1))
    max_steps: int = param(help="optimizer steps; 0 derives them from epochs (with fit_to_budget: the most)",
                           resume=APPLIED, why=_SCHEDULE, check=non_negative, presets=(0, 0, 40))
    warmup_steps: int = param(help="linear warm-up steps before the cosine decay", resume=APPLIED, why=_SCHEDULE,
                              check=non_negative, presets=(500, 50, 5))
    max_length: int = param(help="tokens per training block, at most n_positions", resume=IDENTITY, why=_BLOCKS,
                            check=positive, presets=(512, 128, 64))
    save_steps: int = param(help="checkpoint every this many optimizer steps", resume=APPLIED, why=_NEXT_STEP,
                            check=positive, presets=(1000, 200, 10))
    eval_steps: int = param(help="evaluate every this many optimizer steps", resume=APPLIED, why=_NEXT_STEP,
                            check=positive, presets=(500, 100, 10))
    eval_blocks: int = param(help="validation blocks per evaluation, the same ones every time", resume=BOUND,
                             why="the best model is chosen by the loss on these validation blocks",
                             check=positive, presets=(800, 160, 32))
    max_checkpoints: int = param(help="most recent checkpoints kept; best_model.pt is kept apart", resume=APPLIED,
                                 why=_NEXT_STEP, check=positive, presets=(4, 4, 2))
    time_budget_minutes: float = param(help="from the session's start: save, export and stop before it; 0 for "
                                            "none (kaggle-t4: 11 h, Kaggle stops GPU sessions at 12)",
                                       resume=APPLIED, why=_NEXT_STEP, check=non_negative, presets=(660, 10, 0))
    fit_to_budget: bool = param(help="fit the step count to time_budget_minutes once the first steps are timed: "
                                     "the schedule then ends, decayed, as the budget does (max_steps > 0 caps it)",
                                resume=APPLIED, why="the plan is kept in the checkpoint; another budget plans again",
                                presets=(False, True, False))
    max_bad_steps: int = param(10, help="consecutive non-finite losses before the run stops with an emergency "
                                        "checkpoint", resume=APPLIED, why=_NEXT_STEP, check=positive)
    precision: str = param("auto", help='"auto", "fp32", "fp16" or "bf16"', resume=APPLIED, why=_NEXT_STEP,
                           check=one_of("auto", "fp32", "fp16", "bf16"))
    torch_compile: bool = param(False, help="torch.compile the forward pass: faster on a T4 after a minute of "
                                            "compiling; not on a CPU", resume=APPLIED, why=_NEXT_STEP)
    seed: int = param(42, help="seeds the weights, the data order and dropout", resume=BOUND,
                      why="the data order and the held-out split follow it", check=non_negative)

    @property
    def global_batch(self) -> int:
        """Blocks per optimizer step, over all processes: the number of GPUs shares it out."""
        return self.batch_size * self.gradient_accumulation_steps

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.max_length


@dataclass(frozen=True)
class SamplingConfig:
    prompts: tuple[str, ...] = param((), help="continued at each evaluation and in the generate cell; a list of "
                                              "strings, or one string", resume=APPLIED, why=_SAMPLES,
                                     notebook=list | str | None,
                                     presets=(("The history of", "In 1998 , the"),
                                              ("Return the", "The default value", "This module provides"),
                                              ("Return the",)))
    max_new_tokens: int = param(60, help="tokens generated per sample", resume=APPLIED, why=_SAMPLES,
                                check=positive)
    temperature: float = param(0.8, help="below 1 sharper, above 1 more random", resume=APPLIED, why=_SAMPLES,
                               check=positive)
    top_k: int = param(50, help="sample among the k likeliest tokens; 0 for no limit", resume=APPLIED,
                       why=_SAMPLES, check=non_negative)
    top_p: float = param(0.95, help="... and among the fewest whose probabilities add up to p", resume=APPLIED,
                         why=_SAMPLES, check=lambda name, p: None if 0 < p <= 1 else f"{name}={p!r}: must be in (0, 1]")
    repetition_penalty: float = param(1.0, help="above 1 discourages repeating tokens", resume=APPLIED,
                                      why=_SAMPLES, check=positive)
    num_return_sequences: int = param(1, help="samples per prompt", resume=APPLIED, why=_SAMPLES, check=positive)
    seed: int = param(0, help="the same seed gives the same samples", resume=APPLIED, why=_SAMPLES,
                      name="generation_seed")


@dataclass(frozen=True)
class RunConfig:
    preset: str = param("kaggle-t4", help='"kaggle-t4" (T4 GPU), "cpu-demo" (10 min on a CPU) or "smoke" '
                                          "(seconds)", resume=FREE, group="Run", check=one_of(*PRESETS))
    output_dir: Path = param(help="None: /kaggle/working on Kaggle, else runs/<preset>", resume=FREE, group="Run",
                             notebook=str | None)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    lora_export: str = param("merged", help='final_model of a LoRA run: "merged" (a plain GPT-2) or "adapter" '
                                            "(the adapter alone)", resume=FREE, group="Fine-tuning",
                             check=one_of("merged", "adapter"))
    export_dtype: str = param("float32", help='final_model\'s weights: "float32", "float16" or "bfloat16"',
                              resume=FREE, group="Export", check=one_of("float32", "float16", "bfloat16"))
    export_gguf: bool = param(False, help="also write final_model/model.gguf for llama.cpp / Ollama (needs: pip "
                                          "install gguf)", resume=FREE, group="Export")
    gguf_type: str = param("", help='the GGUF\'s matrices: "" as export_dtype; "q8_0" or "q4_0" quantized (the gguf '
                                    "package's quantizers; it writes no k-quants such as q4_k_m)", resume=FREE,
                           group="Export", check=one_of("", "q8_0", "q4_0"))
    upload_to: str = param("", help='a Kaggle Models handle owner/model/framework/variation: final_model/ is '
                                    'uploaded at the end; "": no upload', resume=FREE, group="Export")
    resume_from_checkpoint: str = param("auto", help='"auto": the newest checkpoint found; "": a fresh run; or a '
                                                     ".pt path", resume=FREE, group="Training")
    devices: str | int = param("auto", help='data-parallel processes: "auto" uses every GPU (2 on GPU T4 x2); '
                                                  "1 for one", resume=APPLIED, group="Training",
                                     why="the same global batch, shared anew over the processes")
    report_to: str = param("none", help='"none", "tensorboard" (event files in output_dir/runs) or "wandb"',
                           resume=APPLIED, why=_NEXT_STEP, group="Training",
                           check=one_of("none", "tensorboard", "wandb"))
    dry_run: bool = param(False, help="show the resolved configuration and train nothing", resume=FREE,
                          group="Training")
    sample_from: str = param("", help="the generate cell's model: empty for the one just trained, or a "
                                      "final_model directory or a .pt checkpoint", resume=FREE, group="Generation")
    eval_hellaswag: str = param("", help='after training: empty to skip; "hub": Rowan/hellaswag (Internet on); '
                                         "or a HellaSwag JSONL file", resume=FREE, group="After training")
    hellaswag_items: int = param(0, help="0: every item; else the first this many", resume=FREE,
                                 group="After training", check=non_negative)
    started_at: float = field(default_factory=paths.session_started_at)  # the time budget counts from it
    given: tuple[str, ...] = ()  # the parameters given a value (not None) in this session

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (stored in checkpoints and beside the run)."""
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))

    @property
    def gguf_kind(self) -> str:
        """The GGUF's matrices: `gguf_type`, or else `export_dtype`."""
        return self.gguf_type or self.export_dtype

    def to_json(self) -> str:
        """The fully resolved config as JSON (`python -m nblib.job --show-config`)."""
        return json.dumps(self.to_dict(), indent=2)


SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "sampling": SamplingConfig}


def validate(cfg: RunConfig) -> list[str]:
    """The rules that join two values (each value's own check is its `param(check=...)`)."""
    m, t = cfg.model, cfg.train
    problems = []
    if m.n_head > 0 and m.n_embd % m.n_head:
        problems.append(f"n_embd={m.n_embd!r}: must be divisible by n_head={m.n_head}")
    if t.max_length > m.n_positions:
        problems.append(f"max_length={t.max_length!r}: must be <= n_positions={m.n_positions}")
    if cfg.gguf_type and not cfg.export_gguf:
        problems.append(f"gguf_type={cfg.gguf_type!r}: set export_gguf=True too, or gguf_type=''")
    if t.fit_to_budget and not t.time_budget_minutes:
        problems.append(NEEDS_BUDGET)
    if cfg.devices != "auto" and (isinstance(cfg.devices, str) or cfg.devices < 1):
        problems.append(f"devices={cfg.devices!r}: must be 'auto' (every GPU) or a number of processes >= 1")
    return problems + _lora_problems(cfg)


def _lora_problems(cfg: RunConfig) -> list[str]:
    m = cfg.model
    if m.lora_r <= 0:
        return []
    problems = []
    if cfg.export_gguf and cfg.lora_export == "adapter":
        problems.append("export_gguf=True: GGUF holds a whole model, and lora_export='adapter' exports the "
                        "adapter alone; use lora_export='merged' or export_gguf=False")
    if m.init_from == SCRATCH:
        problems.append(f"lora_r={m.lora_r}: LoRA adapts a pretrained model; set init_from to a "
                        "Hub id or a local model directory, or lora_r=0")
    if not m.lora_target_modules:
        problems.append("lora_target_modules='': name at least one module, e.g. 'c_attn' or "
                        "'c_attn,c_proj,c_fc'")
    return problems


def started(cfg: RunConfig) -> str:
    """When the session the time budget counts from began, readable."""
    return moment(cfg.started_at)
