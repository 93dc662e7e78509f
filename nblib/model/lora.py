"""Optional LoRA adapters through `peft`: wrap a pretrained GPT-2, merge or save them at export."""
from __future__ import annotations

import copy
import importlib.util

import torch

from nblib.setup.config import ModelConfig


def availability_problems(lora_r: int) -> list[str]:
    """LoRA asked for without peft installed."""
    if lora_r > 0 and importlib.util.find_spec("peft") is None:
        return [f"lora_r={lora_r}: LoRA needs the optional peft package (pip install peft), or set lora_r=0"]
    return []


def wrap(model: torch.nn.Module, cfg: ModelConfig) -> torch.nn.Module:
    """A PeftModel training only rank-`lora_r` adapters on `lora_target_modules` (the config
    refuses lora_r > 0 without peft, so the import error never reaches a cell)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=list(cfg.lora_target_modules), task_type="CAUSAL_LM",
                        fan_in_fan_out=True)  # GPT-2's Conv1D stores its weights transposed
    return get_peft_model(model, config)


def is_lora(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config")


def merged(model: torch.nn.Module) -> torch.nn.Module:
    """A plain GPT2LMHeadModel with the adapters folded into its weights (`model` is untouched)."""
    return copy.deepcopy(model).merge_and_unload()
