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

import itertools
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from nblib import history
from nblib.console import DataError
from nblib.setup.config import RunConfig
from nblib.setup.hardware import Device

VALIDATION_ITEMS = 10_042  # in the Hub's validation split (what eval_hellaswag="hub" scores)

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
    """eval_hellaswag naming a file that is not there, is empty, or holds a line that is not a
    HellaSwag item (every line is read, at setup: not after a night of training)."""
    if source in ("", HUB):
        return []
    path = Path(source).expanduser()
    if not path.is_file():
        return [f"eval_hellaswag={source!r}: no such file; give HellaSwag's validation JSONL "
                f"(hellaswag_val.jsonl), \"{HUB}\" for {HUB_DATASET} on the Hub, or \"\" to skip it"]
    try:
        if not list(_local_items(path)):
            return [f"eval_hellaswag={source!r}: the file holds no item; a score over nothing is no score"]
    except DataError as error:
        return [str(error)]
    return []


def evaluate_run(model: torch.nn.Module, tokenizer, device: Device, cfg: RunConfig) -> Score:
    """The notebook's HellaSwag cell: score the model on `cfg.eval_hellaswag` and add the result
    to the last record of the run's training_history.json (which the summary shows)."""
    result = score(model, tokenizer, load_items(cfg.eval_hellaswag, cfg.hellaswag_items), device,
                   cfg.eval_hellaswag)
    if device.is_main:
        history.add_to_last(cfg.output_dir, hellaswag_accuracy=result.accuracy,
                            hellaswag_sum_accuracy=result.sum_accuracy, hellaswag_items=result.items,
                            hellaswag_source=result.source)
    return result


def load_items(source: str, limit: int = 0) -> list[Item]:
    """The validation items from the Hub (`source="hub"`) or a local JSONL file; `limit` > 0
    keeps the first `limit`.

    Raises:
        console.DataError: a missing or empty file, or a line that is not a HellaSwag item (named
            by its number).
    """
    if source == HUB:
        import datasets

        rows = datasets.load_dataset(HUB_DATASET, split="validation")
        items = (_item(row, f"{HUB_DATASET}, row {number}") for number, row in enumerate(rows, start=1))
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise DataError(spec_problems(source)[0])
        items = _local_items(path)  # each line checked as it is read
    chosen = list(itertools.islice(items, limit or None))
    if not chosen:
        raise DataError(f"eval_hellaswag={source!r}: no item to score; a score over nothing is no score")
    return chosen


def _local_items(path: Path) -> Iterable[Item]:
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                where = f"eval_hellaswag={str(path)!r}, line {number}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(f"{where}: not JSON ({error.msg} at column {error.colno})") from None
                yield _item(row, where)


def _item(row, where: str) -> Item:
    """A HellaSwag item, checked: a context, four endings as strings, a label from 0 to 3."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: not a JSON object with ctx, endings and label")
    context, endings, label = row.get("ctx"), row.get("endings"), row.get("label")
    if isinstance(label, str) and label.strip().isdigit():  # the Hub's labels are strings
        label = int(label)
    problems = [] if isinstance(context, str) else ["ctx must be a string"]
    if not (isinstance(endings, list) and len(endings) == 4 and all(isinstance(e, str) for e in endings)):
        problems.append(f"endings must be a list of four strings, not {type(endings).__name__} "
                        f"{str(endings)[:40]!r}")
    if not (isinstance(label, int) and not isinstance(label, bool) and 0 <= label < 4):
        problems.append(f"label must be 0, 1, 2 or 3, not {label!r}")
    if problems:
        raise DataError(f"{where}: not a HellaSwag item: {'; '.join(problems)}")
    return Item(context, tuple(endings), label)


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
