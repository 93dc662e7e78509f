"""Quality at a fixed budget: validation perplexity after the same number of tokens, nblib (with
precision="auto") against transformers' Trainer (its default fp32), same model and hyper-parameters.

    python bench/quality.py [--steps 400]

Uses ../shared/data's WikiText-2 files when present (valid for training, test for validation),
else the built-in Python-docs corpus. Prints one JSON line per runner, then a short table.
Trainer needs `pip install accelerate`.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from nblib import (
    data,  # noqa: E402
    history,  # noqa: E402
    model,  # noqa: E402
)
from nblib.evaluation import validation  # noqa: E402
from nblib.setup import (
    config,  # noqa: E402
    hardware,  # noqa: E402
)
from nblib.setup.params import resolve  # noqa: E402
from nblib.training import (
    loop,  # noqa: E402
    state,  # noqa: E402
)

SHARED = REPO.parent / "shared" / "data"


def corpus_params(work: Path) -> dict:
    if (SHARED / "wikitext-2-valid.txt").is_file():
        (work / "wiki").mkdir()
        (work / "wiki" / "wiki.train.txt").write_text((SHARED / "wikitext-2-valid.txt").read_text())
        (work / "wiki" / "wiki.valid.txt").write_text((SHARED / "wikitext-2-test.txt").read_text())
        (work / "wiki" / "wiki.test.txt").write_text((SHARED / "wikitext-2-test.txt").read_text()[:200_000])
        return {"dataset": str(work / "wiki" / "*.txt")}
    return {"dataset": "builtin:python-docs"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    # cpu-demo's model with the guide's optimiser settings (lr 5e-4, weight decay 0.01, clip 1.0)
    params = dict(preset="cpu-demo", tokenizer="bpe:8192", learning_rate=5e-4, weight_decay=0.01,
                  dropout=0.0, max_steps=args.steps, warmup_steps=args.steps // 10,
                  eval_steps=args.steps, save_steps=args.steps, output_dir=str(work / "nblib"),
                  resume_from_checkpoint="", **corpus_params(work))
    cfg = resolve(params)
    corpus = data.prepare(cfg)
    val = corpus.blocks("validation")[: 8 * 40]
    fp32 = hardware.detect("fp32")
    rows = []

    state.seed_everything(0)
    net = model.build(cfg.model, corpus.tokenizer)
    started = time.perf_counter()
    result = loop.run(cfg, hardware.detect("auto"), net, corpus)
    rows.append(dict(runner="nblib", precision=hardware.detect("auto").precision,
                     seconds=time.perf_counter() - started, tokens=result.state.tokens_seen,
                     val_loss=validation.evaluate(net, val, fp32, 8)))

    state.seed_everything(0)
    net = model.build(cfg.model, corpus.tokenizer)
    started = time.perf_counter()
    tokens = trainer_run(cfg, net, corpus)
    rows.append(dict(runner="Trainer", precision="fp32", seconds=time.perf_counter() - started,
                     tokens=tokens, val_loss=validation.evaluate(net, val, fp32, 8)))

    for row in rows:
        row.update(bench="quality", dataset=cfg.data.dataset,
                   perplexity=round(history.perplexity(row["val_loss"]), 2),
                   seconds=round(row["seconds"], 1), val_loss=round(row["val_loss"], 4))
        print(json.dumps(row))
    print(f"\n{'runner':8} {'precision':9} {'tokens':>10} {'seconds':>8} {'val loss':>9} {'perplexity':>10}")
    for r in rows:
        print(f"{r['runner']:8} {r['precision']:9} {r['tokens']:>10,} {r['seconds']:>8} {r['val_loss']:>9} "
              f"{r['perplexity']:>10}")
    print(f"validation loss ratio nblib/Trainer: {rows[0]['val_loss'] / rows[1]['val_loss']:.4f}")


def trainer_run(cfg: config.RunConfig, net: torch.nn.Module, corpus: data.Corpus) -> int:
    from transformers import Trainer, TrainingArguments

    blocks, t = corpus.blocks("train"), cfg.train

    class Blocks(torch.utils.data.Dataset):
        def __len__(self):
            return len(blocks)

        def __getitem__(self, i):
            ids = torch.from_numpy(blocks[np.array([i])][0].astype(np.int64))
            return {"input_ids": ids, "labels": ids}  # T+1 tokens: the model shifts, T predictions

    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, max_steps=t.max_steps,
        learning_rate=t.learning_rate, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
        warmup_steps=t.warmup_steps, lr_scheduler_type="cosine", use_cpu=True, save_strategy="no",
        report_to=[], logging_steps=10_000, dataloader_num_workers=0, disable_tqdm=True, seed=0)
    Trainer(model=net, args=args, train_dataset=Blocks()).train()
    return t.max_steps * t.tokens_per_step


if __name__ == "__main__":
    main()
