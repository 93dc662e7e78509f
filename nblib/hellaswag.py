"""HellaSwag: which of four endings a model finds likeliest, scored as nanoGPT and GPT-2 do.

Each item is a context and four endings. The model reads context + " " + ending; the ending's
tokens alone are scored. The pick is the ending with the lowest mean loss per token (nanoGPT's
`acc_norm`, the figure GPT-2 and nanoGPT report); the ending with the highest summed
log-likelihood is reported beside it, as `sum_accuracy`: that is lm-eval's `acc` rule.

Items come from the Hub (`Rowan/hellaswag`, validation: 10,042 items; on Kaggle with the
Internet on) or from a local file in HellaSwag's own JSONL format, one item per line:
`{"ctx": ..., "endings": [four strings], "label": 0-3}` (the other keys are ignored).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .config import RunConfig
from .evaluation import add_to_history
from .hardware import Device

log = logging.getLogger(__name__)

HUB = "hub"
HUB_DATASET = "Rowan/hellaswag"


@dataclass(frozen=True)
class Item:
    context: str
    endings: tuple[str, ...]
    label: int


@dataclass(frozen=True)
class Score:
    accuracy: float  # lowest mean loss over the ending's tokens (nanoGPT, GPT-2)
    sum_accuracy: float  # highest summed log-likelihood of the ending (lm-eval's `acc`)
    items: int
    source: str

    def describe(self) -> str:
        return (f"HellaSwag ({self.source}, {self.items:,} items): accuracy {self.accuracy:.4f} "
                f"(lowest mean loss per ending token; summed log-likelihood: {self.sum_accuracy:.4f}; "
                "chance: 0.25)")


def spec_problems(source: str) -> list[str]:
    """eval_hellaswag naming a file that is not there (checked before training, not after)."""
    if source in ("", HUB) or Path(source).expanduser().is_file():
        return []
    return [f"eval_hellaswag={source!r}: no such file; give HellaSwag's validation JSONL "
            f"(hellaswag_val.jsonl), \"{HUB}\" for {HUB_DATASET} on the Hub, or \"\" to skip it"]


def evaluate_run(model: torch.nn.Module, tokenizer, device: Device, cfg: RunConfig) -> Score:
    """The notebook's HellaSwag cell: score the model on `cfg.eval_hellaswag` and add the result
    to the last record of the run's training_history.json (which the summary shows)."""
    result = score(model, tokenizer, load_items(cfg.eval_hellaswag, cfg.hellaswag_items), device,
                   cfg.eval_hellaswag)
    if device.is_main:
        add_to_history(cfg.output_dir, hellaswag_accuracy=result.accuracy, hellaswag_sum_accuracy=result.sum_accuracy,
                       hellaswag_items=result.items, hellaswag_source=result.source)
    return result


def load_items(source: str, limit: int = 0) -> list[Item]:
    """The validation items from the Hub (`source="hub"`) or a local JSONL file; `limit` > 0
    keeps the first `limit`.

    Raises:
        ValueError: a missing file, or a line that is not a HellaSwag item (named by its number).
    """
    if source == HUB:
        import datasets

        rows: Iterable[dict] = datasets.load_dataset(HUB_DATASET, split="validation")
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise ValueError(f"eval_hellaswag={source!r}: no such file; give HellaSwag's validation "
                             f"JSONL (hellaswag_val.jsonl) or \"{HUB}\" for {HUB_DATASET} on the Hub")
        rows = _read_jsonl(path)
    items = []
    for number, row in enumerate(rows, start=1):
        try:
            items.append(Item(row["ctx"], tuple(row["endings"]), int(row["label"])))
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"eval_hellaswag={source!r}: item {number} is not a HellaSwag item "
                             f"({error!r}); each needs ctx, endings and label") from error
        if len(items) == limit:
            break
    return items


def _read_jsonl(path: Path) -> Iterable[dict]:
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                yield json.loads(line)


def score(model: torch.nn.Module, tokenizer, items: list[Item], device: Device, source: str = "") -> Score:
    """Accuracy of `model` on `items`: one forward pass of the four endings per item."""
    chosen = picks(model, tokenizer, items, device)
    n = max(len(items), 1)
    return Score(sum(mean == item.label for (mean, _), item in zip(chosen, items)) / n,
                 sum(summed == item.label for (_, summed), item in zip(chosen, items)) / n, len(items), source)


@torch.no_grad()
def picks(model: torch.nn.Module, tokenizer, items: list[Item], device: Device) -> list[tuple[int, int]]:
    """Each item's chosen ending: (lowest mean loss, highest summed log-likelihood)."""
    model.eval()
    chosen = []
    for item in tqdm(items, desc="HellaSwag", unit="item", mininterval=2.0, dynamic_ncols=True):
        mean_losses, sum_losses = _ending_losses(model, tokenizer, item, model.config.n_positions, device)
        chosen.append((int(mean_losses.argmin()), int(sum_losses.argmin())))
    return chosen


def _ending_losses(model, tokenizer, item: Item, context_size: int,
                   device: Device) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, summed) loss of each ending's tokens after the context, the context cut from the
    left where the two exceed the model's context."""
    context = tokenizer.encode(item.context)
    rows, masks = [], []
    for ending in item.endings:
        ending_ids = tokenizer.encode(" " + ending)
        ids = (context + ending_ids)[-context_size:]
        scored = min(len(ending_ids), len(ids) - 1)  # an ending longer than the context: its end
        rows.append(ids)
        masks.append([0] * (len(ids) - scored) + [1] * scored)
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows], device=device.device)
    mask = torch.tensor([m + [0] * (width - len(m)) for m in masks], device=device.device, dtype=torch.float32)
    with device.autocast():
        logits = model(input_ids=ids).logits.float()
    losses = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    losses = losses.view(len(rows), -1) * mask[:, 1:]
    sums = losses.sum(dim=1)
    return sums / mask[:, 1:].sum(dim=1), sums
