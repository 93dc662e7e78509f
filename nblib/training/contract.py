"""A run's identity, and what a resume may change: the one table that says which parameter is which.

A run is its tokenizer, its data, its blocks and its model. Their fingerprint goes into every
checkpoint and `run_config.json`, and a resume whose fingerprint differs is refused, naming each
difference. Everything else a resume may change is applied to the resumed state, logged once
("learning_rate 0.003 -> 0.0001 from step 40") and recorded in the history's events.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nblib.console import Refusal
from nblib.setup import parameters
from nblib.setup.config import APPLIED, BOUND, GPT2_TOKENIZER, GPT2_TOKENIZERS, IDENTITY, RunConfig
from nblib.training import checkpoint, collectives
from nblib.training.state import TrainState, global_batch_of

log = logging.getLogger(__name__)

RULES = parameters.RULES  # name -> (rule, why), declared with each parameter (config.param)

SHAPE = ("max_length", "stride", "drop_remainder", "vocab_size", "n_positions", "n_embd", "n_layer",
         "n_head", "n_inner", "init_from", "lora_r", "lora_alpha", "lora_target_modules")
DATA_PARAMETERS = tuple(name for name, (kind, _) in RULES.items() if kind == IDENTITY and name not in SHAPE)
# ^ what the tokens are made from: the rest of a run's identity


class RunMismatch(Refusal, ValueError):
    """A checkpoint of another run: resuming it would mix two runs."""


@dataclass(frozen=True)
class Change:
    name: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.name} {self.old!r} -> {self.new!r}"


def parameter_values(config: dict[str, Any]) -> dict[str, Any]:
    """A RunConfig's dict (`RunConfig.to_dict`, as checkpoints store it) by parameter name."""
    sections = {k: v for k, v in config.items() if isinstance(v, dict) and k != "fingerprint"}
    flat = {k: v for k, v in config.items() if k not in sections and k != "fingerprint"}
    for name, section in sections.items():
        flat.update({k: v for k, v in section.items() if not (name == "sampling" and k == "seed")})
    if "sampling" in sections:
        flat["generation_seed"] = sections["sampling"].get("seed")
    return {k: v for k, v in flat.items() if k in RULES}


def fingerprint(cfg: RunConfig, corpus=None) -> dict[str, Any]:
    """The run's identity: its block and model shape, and with the prepared `corpus` the content
    of its tokenizer and of its tokenized splits."""
    shape = fingerprint_of(parameter_values(cfg.to_dict()))
    if corpus is None:
        return shape
    tokens = ", ".join(f"{split} {len(t):,}" for split, t in corpus.tokens.items())
    return {**shape, "vocab_size": cfg.model.vocab_size or len(corpus.tokenizer),
            "tokenizer": {"sha256": tokenizer_digest(corpus.tokenizer),
                          "about": f"{cfg.data.tokenizer} ({len(corpus.tokenizer):,} tokens)"},
            "data": {"sha256": _digest(corpus.digests),
                     "about": f"dataset={cfg.data.dataset!r} ({tokens} tokens)", "chat": corpus.is_chat}}


@functools.lru_cache(maxsize=4)  # one hash per tokenizer object: its vocabulary is hashed once a run
def tokenizer_digest(tokenizer) -> str:
    """sha256 of a fast tokenizer's vocabulary and merges (in one form across tokenizers versions)."""
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = [" ".join(m) if isinstance(m, list) else m for m in model.get("merges", [])]
    return _digest({"vocab": sorted(tokenizer.get_vocab().items()), "merges": merges,
                    "eos": tokenizer.eos_token})


def check(saved: dict[str, Any], cfg: RunConfig, world_size: int, corpus=None,
          path: Path | str = "the checkpoint") -> list[Change]:
    """Compare a checkpoint with this run; returns the allowed changes to apply.

    Without `corpus` (the setup cell, before any data work) the shape and the bound parameters
    are compared; with it, the tokenizer's and the data's content too.

    Raises:
        RunMismatch: naming each differing item, old and new, and the ways out.
    """
    saved_config = saved.get("config", {})
    old, new = parameter_values(saved_config), parameter_values(cfg.to_dict())
    old_print = saved_config.get("fingerprint") or fingerprint_of(old)
    new_print = fingerprint(cfg, corpus)
    problems = [f"{name}: checkpoint {_shown(old_print[name])}, this run {_shown(new_print[name])}"
                + (_changed_data_parameters(old, new) if name == "data" else "")
                for name in new_print if name in old_print and _key(old_print[name]) != _key(new_print[name])]
    chat = isinstance(old_print.get("data"), dict) and old_print["data"].get("chat")
    if chat and corpus is None and old.get("train_on") not in (None, new["train_on"]):  # known before tokenizing
        problems.append(f"train_on: checkpoint {old['train_on']!r}, this run {new['train_on']!r} (which "
                        "tokens of the conversations carry loss)")
    problems += [f"{name}: checkpoint {old[name]!r}, this run {new[name]!r} ({why})"
                 for name, (kind, why) in RULES.items()
                 if kind == BOUND and old.get(name) is not None and old[name] != new[name]]
    problem = _global_batch_problem(saved, cfg, world_size)
    if problem:
        problems.append(problem)
    if problems:
        raise RunMismatch(
            f"{path} (step {saved.get('step')}) cannot be continued with this run's settings:\n  - "
            + "\n  - ".join(problems)
            + f"\nResuming it would mix two runs. To continue it, set these back. To keep both, "
              f"give this run another output_dir; to replace it, move its files (checkpoints/, "
              f"{checkpoint.BEST_MODEL}, {checkpoint.EMERGENCY}) out of {_run_folder(path)}.")
    return [Change(name, old[name], new[name]) for name, (kind, _) in RULES.items()
            if kind == APPLIED and name in old and old[name] != new[name]]


def _changed_data_parameters(old: dict, new: dict) -> str:
    """'; changed: train_on 'responses' -> 'all'': the data parameters behind a change of tokens."""
    changed = [f"{name} {old[name]!r} -> {new[name]!r}" for name, (kind, _) in RULES.items()
               if name in DATA_PARAMETERS and name in old and old[name] != new[name]]
    return f"; changed: {', '.join(changed)}" if changed else ""


def fingerprint_of(values: dict[str, Any]) -> dict[str, Any]:
    """The shape part of a fingerprint, from parameter values (an older checkpoint's config has
    no fingerprint of its own). `vocab_size=None` means the tokenizer's: known with the data."""
    shape = {name: values[name] for name in SHAPE
             if name in values and not (name == "vocab_size" and values[name] is None)}
    if shape.get("init_from") in GPT2_TOKENIZERS:  # "gpt2" is the Hub's old alias of the same model
        shape["init_from"] = GPT2_TOKENIZER
    return shape


def _global_batch_problem(saved: dict, cfg: RunConfig, world_size: int) -> str | None:
    """A run's global batch is fixed at its start: its steps, its schedule and its data position
    count in it. `devices` may change (the batch is shared anew), and so may the split of
    `batch_size` x `gradient_accumulation_steps`, as long as the product stays."""
    t, kept = cfg.train, global_batch_of(saved)
    if t.global_batch != kept:
        return (f"global batch: checkpoint {kept} blocks per optimizer step, this run {t.batch_size} x "
                f"{t.gradient_accumulation_steps} = {t.global_batch} (a run's steps, schedule and data "
                f"position count in its global batch: keep batch_size x gradient_accumulation_steps = {kept})")
    if kept % world_size:
        return (f"devices: the checkpoint's global batch of {kept} blocks cannot be shared evenly by "
                f"{world_size} processes; use devices={saved.get('world_size', 1)}")
    return None


def resume(state: TrainState, path: Path, saved: dict, changes: list[Change], cfg: RunConfig,
           world_size: int) -> None:
    """Load a checkpoint into `state`, then apply the allowed changes: the micro-batch split, the
    optimizer's learning rate and weight decay, the schedule derived again. Each change is logged
    and kept in the history's events."""
    state.load_state_dict(saved)
    _split_global_batch(state, cfg, world_size,
                        new_split=any(c.name in ("batch_size", "gradient_accumulation_steps") for c in changes))
    state.optimizer.param_groups[0]["weight_decay"] = cfg.train.weight_decay  # the matrices; the rest stay at 0
    if not cfg.train.fit_to_budget or any(c.name in ("time_budget_minutes", "fit_to_budget") for c in changes):
        state.planned_steps = None  # planned again in this session (training.planning), or not fitted at all
    elif state.planned_steps is not None:
        state.schedule.total_steps = state.planned_steps  # the plan the checkpoint holds: the run stays exact
    state.schedule.apply(state.optimizer, state.step)  # this run's peak and length, from the resumed step
    log.info("resumed from %s at step %d (epoch %d, block %d of its order)",
             path, state.step, state.epoch, state.position)
    for change in changes:
        log.info("%s from step %d", change, state.step)
        state.events.append({"step": state.step, "event": "changed", "parameter": change.name,
                             "old": change.old, "new": change.new})


def _split_global_batch(state: TrainState, cfg: RunConfig, world_size: int, new_split: bool) -> None:
    """The checkpoint's global batch over `world_size` processes: the configured micro-batch when
    the split was changed, else the checkpoint's (OOM back-offs kept)."""
    batch_size = cfg.train.batch_size if new_split else state.batch_size
    if new_split or state.world_size != world_size:  # check() made sure the processes share it evenly
        state.batch_size, state.gradient_accumulation_steps = collectives.share(
            state.global_batch, batch_size, world_size)
    if state.world_size != world_size:
        log.info("resuming a %d-process run in %d: global batch %d kept as %d x %d per process",
                 state.world_size, world_size, state.global_batch, state.batch_size,
                 state.gradient_accumulation_steps)
    state.world_size = world_size


def find(cfg: RunConfig, world_size: int, corpus=None) -> tuple[Path, dict, list[Change]] | None:
    """The checkpoint this run continues, and the changes to apply to it. With "auto", another
    run's checkpoint found in an attached input (/kaggle/input) is passed over with a warning;
    one in `output_dir`, or given by path, is refused.

    Raises:
        RunMismatch: naming each difference, old and new.
        ValueError: `resume_from_checkpoint=""` while `output_dir` holds checkpoints.
    """
    changes: list[Change] = []

    def accept(path: Path, saved: dict) -> bool:
        try:
            changes[:] = check(saved, cfg, world_size, corpus, path)
        except RunMismatch as error:
            attached = Path(cfg.output_dir).resolve() not in Path(path).resolve().parents
            if cfg.resume_from_checkpoint != "auto" or not attached:
                raise
            log.warning("passing over %s, an attached checkpoint of another run (%s)", path,
                        str(error).splitlines()[1].strip(" -"))
            return False
        return True

    found = checkpoint.find_resume(cfg.output_dir, cfg.resume_from_checkpoint, accept)
    return None if found is None else (*found, changes)


def preview(cfg: RunConfig, world_size: int) -> str:
    """What the train cell will do with `output_dir`, checked before any data work.

    Raises:
        RunMismatch: the checkpoint it would resume belongs to another run.
        ValueError: `resume_from_checkpoint=""` while `output_dir` holds checkpoints.
    """
    found = find(cfg, world_size)
    if found is None:
        return f"a new run in {cfg.output_dir}"
    return (f"continuing the run in {found[0]} from step {found[1]['step']} (its tokenizer and data "
            "are compared once they are loaded)")


def _run_folder(path: Path) -> Path:
    """The run directory a checkpoint file belongs to."""
    path = Path(path)
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _key(item: Any) -> Any:
    return item["sha256"] if isinstance(item, dict) else item


def _shown(item: Any) -> str:
    return f"{item['about']}, sha256 {item['sha256'][:12]}" if isinstance(item, dict) else repr(item)
