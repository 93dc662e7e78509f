"""The parameter boundary: the notebook's parameters cell, papermill's -p/-f, a job file -> RunConfig.

`DEFAULTS` is the one table of parameters and their defaults; the notebook's parameters cell
holds the same values (a test compares them). `None` means "the preset's value", and only
`None`: `""` is a value (`dataset_config=""` is "no configuration"). Each parameter's type is
its config field's annotation; a few parameters are spelt differently in the notebook
(`BOUNDARY_TYPES`).
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

from . import config, paths
from .config import PRESET_VALUES, PRESETS, SCRATCH, RunConfig
from .console import ConfigError

DEFAULTS: dict[str, Any] = {
    "preset": "kaggle-t4", "output_dir": None,
    # data
    "dataset": None, "dataset_config": None, "text_column": "text", "tokenizer": None, "stride": None,
    "drop_remainder": True, "token_key": "", "data_format": "auto", "train_on": "responses",
    "instruction_column": "instruction", "response_column": "response",
    # fine-tuning
    "init_from": SCRATCH, "lora_r": 0, "lora_alpha": 16.0, "lora_dropout": 0.05,
    "lora_target_modules": "c_attn", "lora_export": "merged", "export_dtype": "float32",
    "export_gguf": False, "upload_to": "",
    # model
    "vocab_size": None, "n_positions": None, "n_embd": None, "n_layer": None, "n_head": None,
    "n_inner": None, "dropout": None,
    # training
    "batch_size": None, "gradient_accumulation_steps": None, "learning_rate": None, "weight_decay": None,
    "max_grad_norm": None, "epochs": None, "max_steps": None, "warmup_steps": None, "max_length": None,
    "save_steps": None, "eval_steps": None, "eval_blocks": None, "max_checkpoints": None,
    "time_budget_minutes": None, "max_bad_steps": 10, "resume_from_checkpoint": "auto",
    "precision": "auto", "devices": "auto", "torch_compile": False, "seed": 42, "report_to": "none",
    "dry_run": False,
    # generation
    "prompts": None, "max_new_tokens": 60, "temperature": 0.8, "top_k": 50, "top_p": 0.95,
    "repetition_penalty": 1.0, "num_return_sequences": 1, "generation_seed": 0, "sample_from": "",
    # after training
    "eval_hellaswag": "", "hellaswag_items": 0,
}
PARAMETERS = tuple(DEFAULTS)

# Parameters whose notebook spelling differs from their config field's type.
BOUNDARY_TYPES: dict[str, Any] = {
    "preset": str, "output_dir": str | None, "lora_target_modules": str,  # comma-separated
    "prompts": list | str | None, "generation_seed": int, "devices": str | int,
}


def resolve(params: Mapping[str, Any]) -> RunConfig:
    """Build the validated RunConfig from the notebook's parameters.

    Args:
        params: the parameters by name: a plain mapping (a job file), or a notebook's
            `globals()`, whose other names (a user's own `x = 3`) are ignored, except those
            papermill injected. `None` means "the preset's value".

    Raises:
        ValueError: naming every offending parameter, its value and what is allowed; a name
            that is no parameter (a misspelling) is one of them.
    """
    unknown = [_unknown(name) for name in sorted(passed_names(params) - set(PARAMETERS))
               if not name.startswith("PAPERMILL_")]  # papermill --inject-paths adds these
    if unknown:
        raise ConfigError(_format(unknown))
    explicit = {k: params[k] for k in PARAMETERS if params.get(k) is not None}
    preset = explicit.get("preset", DEFAULTS["preset"])
    if preset not in PRESETS:
        raise ConfigError(f"preset={preset!r}: must be one of {', '.join(PRESETS)}")
    merged = {**DEFAULTS, **PRESET_VALUES[preset], **explicit}
    if "dataset_config" not in explicit and merged["dataset"] != PRESET_VALUES[preset]["dataset"]:
        merged["dataset_config"] = ""  # the preset's configuration belongs to the preset's dataset
    merged = {name: _number_from_text(name, value) for name, value in merged.items()}
    problems = [problem for name in PARAMETERS for problem in _type_problem(name, merged[name])]
    if not problems and merged["init_from"] != SCRATCH:
        from . import model  # transformers: imported only when there is a pretrained model to read

        problems = model.pretrained_shape(merged, explicit)
    if not problems:
        problems = [f"{name}='': {why}" for name, why in _NOT_EMPTY.items() if merged[name] == ""]
    if problems:
        raise ConfigError(_format(problems))
    cfg = _build(preset, merged)
    problems = config.validate(cfg) or probe(cfg)  # the rules first: they answer at once
    if problems:
        raise ConfigError(_format(problems))
    return cfg


def probe(cfg: RunConfig) -> list[str]:
    """What the string parameters name, checked where it lives (the disk, the installed
    packages; the Hub only through `init_from`): each domain module checks its own. Imported
    here, so that a misspelt or invalid parameter is answered before torch, transformers and
    datasets load."""
    from . import gguf_export, hellaswag, lora, publish, sources, tokenizer

    d, m = cfg.data, cfg.model
    problems = tokenizer.spec_problems(d.tokenizer, m.vocab_size, own_of_init_from=d.tokenizer == m.init_from)
    problems += sources.spec_problems(d.dataset) + lora.availability_problems(m.lora_r)
    problems += hellaswag.spec_problems(cfg.eval_hellaswag) + gguf_export.availability_problems(cfg.export_gguf)
    problems += publish.handle_problems(cfg.upload_to)
    if cfg.sample_from and not Path(cfg.sample_from).exists():
        problems.append(f"sample_from={cfg.sample_from!r}: no such directory or checkpoint "
                        "(empty: the model just trained)")
    if cfg.resume_from_checkpoint not in ("", "auto") and not Path(cfg.resume_from_checkpoint).is_file():
        problems.append(f"resume_from_checkpoint={cfg.resume_from_checkpoint!r}: no such file "
                        "(use '' for a fresh run or 'auto' for the newest checkpoint)")
    return problems


_NOT_EMPTY = {
    "output_dir": "name a directory, or None for /kaggle/working on Kaggle and runs/<preset> elsewhere",
    "dataset": "name a dataset, or None for the preset's",
    "tokenizer": "name a tokenizer, or None for the preset's",
    "text_column": "name the column that holds the text",
}


def passed_names(params: Mapping[str, Any]) -> set[str]:
    """The names a user passed as parameters: every key of a plain mapping; in a notebook's
    namespace, those papermill assigned in the cell it injects (`# Parameters`, found in
    IPython's input history `In`), for papermill only logs an unknown name and runs on."""
    if "__name__" not in params:  # not a module's or kernel's namespace
        return set(params)
    names = set()
    for source in params.get("In") or []:
        if isinstance(source, str) and source.startswith("# Parameters\n"):
            try:
                tree = ast.parse(source)
            except SyntaxError:
                continue
            names |= {target.id for node in tree.body if isinstance(node, ast.Assign)
                      for target in node.targets if isinstance(target, ast.Name)}
    return names


def parameter_type(name: str) -> Any:
    """What the notebook may pass as `name`: its config field's annotation, None allowed where
    None is the default ("the preset's value")."""
    if name in BOUNDARY_TYPES:
        return BOUNDARY_TYPES[name]
    annotation = _FIELD_TYPES[name]
    return annotation | None if DEFAULTS[name] is None else annotation


def _field_types() -> dict[str, Any]:
    hints = {}
    for cls in (config.DataConfig, config.ModelConfig, config.TrainConfig, config.SamplingConfig, RunConfig):
        hints.update(typing.get_type_hints(cls, vars(config)))
    return {name: hints[name] for name in PARAMETERS if name in hints}


_FIELD_TYPES = _field_types()


def _number_from_text(name: str, value: Any) -> Any:
    """A number parameter given as text that reads as one: `3e-4` from papermill's -f YAML (YAML
    1.1 floats need a dot, so it arrives as a string) is what papermill's -p makes of it."""
    expected = parameter_type(name)
    if isinstance(value, str) and _conforms(0.5, expected) and not _conforms("", expected):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _type_problem(name: str, value: Any) -> list[str]:
    expected = parameter_type(name)
    if _conforms(value, expected):
        return []
    if name == "devices":
        return [f"devices={value!r}: must be 'auto' (every GPU) or a number of processes >= 1"]
    if name == "prompts":
        return [f"prompts={value!r}: must be a list of strings (or one string)"]
    return [f"{name}={value!r}: must be {_describe(expected)}"]


def _conforms(value: Any, expected: Any) -> bool:
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if origin in (Union, types.UnionType):
        return any(_conforms(value, arm) for arm in args)
    if expected is type(None):
        return value is None
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is str:
        return isinstance(value, (str, Path))
    if expected is list or origin in (list, tuple):
        return isinstance(value, (list, tuple)) and all(isinstance(x, str) for x in value)
    return isinstance(value, expected)


def _describe(expected: Any) -> str:
    args = typing.get_args(expected)
    if args:
        kinds = [_describe(a) for a in args if a is not type(None)]
        return " or ".join(kinds) + (" or None" if type(None) in args else "")
    return {bool: "True or False", int: "an integer", float: "a number", str: "a string"}.get(expected, str(expected))


def _build(preset: str, v: dict[str, Any]) -> RunConfig:
    def pick(cls, **values):
        names = [f.name for f in dataclasses.fields(cls) if f.name in v and f.name not in values]
        return cls(**{name: v[name] for name in names}, **values)

    output_dir = Path(v["output_dir"]) if v["output_dir"] is not None else paths.default_output_dir(preset)
    targets = tuple(m.strip() for m in v["lora_target_modules"].split(",") if m.strip())
    prompts = (v["prompts"],) if isinstance(v["prompts"], str) else tuple(v["prompts"])
    return RunConfig(
        preset=preset, output_dir=output_dir, data=pick(config.DataConfig),
        model=pick(config.ModelConfig, lora_target_modules=targets), train=pick(config.TrainConfig),
        sampling=pick(config.SamplingConfig, prompts=prompts, seed=v["generation_seed"]),
        resume_from_checkpoint=str(v["resume_from_checkpoint"]), dry_run=v["dry_run"],
        devices=v["devices"], report_to=v["report_to"], lora_export=v["lora_export"], export_dtype=v["export_dtype"],
        export_gguf=v["export_gguf"], upload_to=str(v["upload_to"]),
        sample_from=str(v["sample_from"]), eval_hellaswag=str(v["eval_hellaswag"]),
        hellaswag_items=v["hellaswag_items"],
    )


def _unknown(name: str) -> str:
    close = difflib.get_close_matches(name, PARAMETERS, n=1)
    return f"unknown parameter {name}" + (f"; did you mean {close[0]}?" if close else
                                          " (the parameters are listed in docs/parameters.md)")


def _format(problems: list[str]) -> str:
    return "Invalid notebook parameters:\n  - " + "\n  - ".join(problems)
