"""The parameter boundary: the notebook's parameters cell, papermill's -p/-f, a job file -> RunConfig.

What each parameter is (its type, default or per-preset values, check) comes from the one table,
`parameters.TABLE`, read off the config's fields. `None` means "the preset's value", and only
`None`: `""` is a value (`dataset_config=""` is "no configuration").
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

from nblib.console import ConfigError
from nblib.setup import config, parameters, paths
from nblib.setup.config import PRESETS, SCRATCH, RunConfig
from nblib.setup.parameters import DEFAULTS, NAMES, PRESET_VALUES

PARAMETERS = NAMES  # the notebook's parameters, in the parameters cell's order


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
        from nblib.model import gpt2  # transformers: imported only when there is a pretrained model to read

        problems = gpt2.pretrained_shape(merged, explicit)
    if not problems:
        problems = [f"{name}='': {why}" for name, why in _NOT_EMPTY.items() if merged[name] == ""]
    if problems:
        raise ConfigError(_format(problems))
    cfg = dataclasses.replace(_build(preset, merged), given=tuple(explicit))
    problems = parameters.value_problems(merged) + config.validate(cfg) or probe(cfg)  # the rules answer at once
    if problems:
        raise ConfigError(_format(problems))
    return cfg


def describe(cfg: RunConfig) -> str:
    """The configuration as the setup cell shows it: every value the preset gave (each parameter
    left at None), by heading, then the values given here; the rest are the cell's defaults."""
    values = values_of(cfg)
    lines = [f"preset {cfg.preset}, output_dir {cfg.output_dir}"]
    for group in parameters.GROUPS:
        filled = [f"{p.name} = {values[p.name]!r}" for p in parameters.TABLE
                  if p.group == group and p.presets and p.name not in cfg.given]
        if filled:
            lines.append(f"{group}, from preset {cfg.preset}: {', '.join(filled)}")
    given = [f"{name} = {values[name]!r}" for name in cfg.given if name not in ("preset", "output_dir")]
    if given:
        lines.append(f"given here: {', '.join(given)}")
    lines.append(f"every other parameter at its default in the parameters cell (docs/parameters.md); the time "
                 f"budget counts from {config.started(cfg)}, the session's start")
    return "\n".join(lines)


def values_of(cfg: RunConfig) -> dict[str, Any]:
    """Each parameter's resolved value, by its notebook name."""
    sections = {"": cfg, **{name: getattr(cfg, name) for name in config.SECTIONS}}
    return {p.name: getattr(sections[p.section], p.field) for p in parameters.TABLE}


def probe(cfg: RunConfig) -> list[str]:
    """What the string parameters name, checked where it lives (the disk, the installed
    packages; the Hub only through `init_from`): each domain module checks its own. Imported
    here, so that a misspelt or invalid parameter is answered before torch, transformers and
    datasets load."""
    from nblib.data import sources, tokenizer
    from nblib.evaluation import hellaswag
    from nblib.export import gguf_file, publish
    from nblib.model import lora

    d, m = cfg.data, cfg.model
    problems = tokenizer.spec_problems(d.tokenizer, m.vocab_size, own_of_init_from=d.tokenizer == m.init_from)
    problems += sources.spec_problems(d.dataset) + lora.availability_problems(m.lora_r)
    problems += hellaswag.spec_problems(cfg.eval_hellaswag) + gguf_file.availability_problems(cfg.export_gguf)
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
    """What the notebook may pass as `name` (None allowed where None is the default: "the preset's value")."""
    return parameters.BY_NAME[name].type


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
    """The RunConfig of resolved values `v`: each parameter into its section's field, in the
    field's own form (a tuple of prompts, of LoRA modules; a Path)."""
    v = {**v, "output_dir": Path(v["output_dir"]) if v["output_dir"] is not None else paths.default_output_dir(preset),
         "lora_target_modules": tuple(m.strip() for m in v["lora_target_modules"].split(",") if m.strip()),
         "prompts": (v["prompts"],) if isinstance(v["prompts"], str) else tuple(v["prompts"])}
    for name in ("resume_from_checkpoint", "upload_to", "sample_from", "eval_hellaswag"):
        v[name] = str(v[name])  # a Path from a job file
    fields: dict[str, dict[str, Any]] = {section: {} for section in ("", *config.SECTIONS)}
    for p in parameters.TABLE:
        fields[p.section][p.field] = v[p.name]
    sections = {name: cls(**fields[name]) for name, cls in config.SECTIONS.items()}
    return RunConfig(**fields[""], **sections)


def _unknown(name: str) -> str:
    close = difflib.get_close_matches(name, PARAMETERS, n=1)
    return f"unknown parameter {name}" + (f"; did you mean {close[0]}?" if close else
                                          " (the parameters are listed in docs/parameters.md)")


def _format(problems: list[str]) -> str:
    return "Invalid notebook parameters:\n  - " + "\n  - ".join(problems)
