"""The table of notebook parameters, read off the config's fields (config.param): each one's name,
type in the notebook, default or per-preset values, heading, resume rule, check and help. The
boundary (params), the resume contract (contract) and docs/parameters.md all derive from it.

    python -m nblib.setup.parameters > docs/parameters.md
"""
from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nblib.setup import config
from nblib.setup.config import PRESETS, SECTIONS, RunConfig

GROUPS = ("Run", "Data", "Fine-tuning", "Export", "Model", "Training", "Generation", "After training")
_SECTION_GROUPS = {"data": "Data", "model": "Model", "train": "Training", "sampling": "Generation"}


@dataclass(frozen=True)
class Parameter:
    name: str  # in the notebook
    section: str  # the RunConfig attribute that holds it ("" for RunConfig itself)
    field: str  # its field's name there
    type: Any  # what the notebook may pass
    default: Any  # in the notebook; None: the preset's value
    presets: dict[str, Any] | None  # preset -> value, where the default is None
    group: str  # its heading in the notebook and the docs
    resume: str  # config.IDENTITY, BOUND, APPLIED or FREE
    why: str
    help: str
    check: Callable[[str, Any], str | None] | None


def _notebook_value(value: Any) -> Any:
    """A field's default as the notebook spells it: a tuple of module names is one comma-separated string."""
    return ",".join(value) if isinstance(value, tuple) and value else value


def _parameters() -> tuple[Parameter, ...]:
    table = []
    for section, cls in (*SECTIONS.items(), ("", RunConfig)):  # RunConfig last: its fields end their groups
        hints = typing.get_type_hints(cls, vars(config))
        for f in dataclasses.fields(cls):
            meta = f.metadata
            if "help" not in meta:
                continue  # a section, or the session's clock
            default = None if meta["presets"] else _notebook_value(f.default)
            kind = meta["notebook"] or (hints[f.name] | None if default is None else hints[f.name])
            table.append(Parameter(meta["name"] or f.name, section, f.name, kind, default, meta["presets"],
                                   meta["group"] or _SECTION_GROUPS[section], meta["resume"], meta["why"],
                                   meta["help"], meta["check"]))
    return tuple(sorted(table, key=lambda p: GROUPS.index(p.group)))


TABLE = _parameters()
BY_NAME = {p.name: p for p in TABLE}
NAMES = tuple(BY_NAME)
DEFAULTS = {p.name: p.default for p in TABLE}
PRESET_VALUES = {preset: {p.name: p.presets[preset] for p in TABLE if p.presets} for preset in PRESETS}
RULES = {p.name: (p.resume, p.why) for p in TABLE}


def value_problems(values: dict[str, Any]) -> list[str]:
    """Each value's own check (a positive size, a known choice)."""
    return [problem for p in TABLE if p.check and p.name in values and values[p.name] is not None
            for problem in [p.check(p.name, values[p.name])] if problem]


def markdown() -> str:
    """docs/parameters.md: every parameter, by heading, with its default or preset values and its
    resume rule."""
    lines = ["# Parameters", "",
             "Every parameter of the notebook's parameters cell, generated from nblib's one table "
             "(`python -m nblib.setup.parameters > docs/parameters.md`; a test keeps this file current). "
             "`None` means the preset's value, and only `None`: `\"\"` is a value. The last column "
             "is the parameter's rule in the [resume contract](resume-contract.md).", ""]
    for group in GROUPS:
        lines += [f"## {group}", "", "| parameter | default | what it does | on resume |", "|---|---|---|---|"]
        for p in (p for p in TABLE if p.group == group):
            default = (", ".join(f"{preset}: {_shown(p.presets[preset])}" for preset in PRESETS) if p.presets
                       else _shown(p.default))
            rule = p.resume + (f": {p.why}" if p.why else "")
            lines.append(f"| `{p.name}` | {default} | {p.help.replace('|', '/')} | {rule} |")
        lines.append("")
    return "\n".join(lines)


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        value = list(value)
    return f"`{value!r}`"


if __name__ == "__main__":
    print(markdown(), end="")
