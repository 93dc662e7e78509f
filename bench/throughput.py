"""Training throughput: nblib's loop against a minimal PyTorch loop and transformers' Trainer.

Same model, data, micro-batch, accumulation and precision; tokens/s measured after warm-up steps;
model FLOPs utilisation against this machine's matmul peak measured in the same run.

    python bench/throughput.py [--size smoke|guide] [--steps 12] [--warmup 3]

Prints one JSON line per measurement, then a short table. Trainer needs `pip install accelerate`.
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
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nblib import config, data, hardware, model, optimization, state, tokenizer, train  # noqa: E402
from nblib.params import resolve  # noqa: E402

SIZES = {  # the smoke preset's model, and the guide's model with a 128- or 256-token block
    "smoke": dict(preset="smoke", vocab_size=512, batch_size=16, gradient_accumulation_steps=1),
    "guide": dict(preset="kaggle-t4", max_length=128, batch_size=8, gradient_accumulation_steps=1),
    "guide-256": dict(preset="kaggle-t4", max_length=256, batch_size=8, gradient_accumulation_steps=1),
}


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    """Measured FLOP/s of an n x n matmul in `dtype` on this CPU."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - started)


def flops_per_token(cfg: config.RunConfig, vocab: int) -> float:
    """6 x the matmul parameters (blocks and the tied lm_head) + attention's 12 x L x T x d."""
    m = cfg.model
    per_block = 4 * m.n_embd**2 + 2 * m.n_embd * m.n_inner
    return 6 * (m.n_layer * per_block + vocab * m.n_embd) + 12 * m.n_layer * cfg.train.max_length * m.n_embd


def make_corpus(cfg: config.RunConfig, vocab: int, blocks: int) -> data.Corpus:
    rng = np.random.default_rng(0)
    flat = rng.integers(0, vocab - 1, size=blocks * (cfg.train.max_length + 1)).astype(np.uint16)
    tokens = {"train": flat, "validation": flat[: 4 * (cfg.train.max_length + 1)], "test": flat[:1]}
    # Random ids over the model's vocabulary; a small real tokenizer for the samples and the fingerprint.
    small = tokenizer.train_bpe(["the river city was built in the north by an old king"] * 50, 300)
    return data.Corpus(small, Path(tempfile.mkdtemp()), tokens, cfg.train.max_length)


def run_nblib(cfg: config.RunConfig, corpus: data.Corpus, warmup: int, steps: int) -> float:
    """tokens/s of train.run over the steps after `warmup` (the history's window excludes evaluation)."""
    state.seed_everything(0)
    net = model.build(cfg.model, corpus.tokenizer)
    result = train.run(cfg, hardware.detect(cfg.train.precision), net, corpus)
    return result.history[1]["tokens_per_second"]


def run_minimal(cfg: config.RunConfig, corpus: data.Corpus, warmup: int, steps: int) -> float:
    """The same model and optimizer in a bare nanoGPT-style loop: no logging, no checkpoints."""
    state.seed_everything(0)
    device = hardware.detect(cfg.train.precision)
    net = model.build(cfg.model, corpus.tokenizer)
    opt = optimization.build_optimizer(net, cfg)
    blocks, t = corpus.blocks("train"), cfg.train
    n_micro = (warmup + steps) * t.gradient_accumulation_steps
    micro = np.random.default_rng(0).permutation(len(blocks))[: n_micro * t.batch_size].reshape(n_micro, -1)
    net.train()
    for i in range(warmup + steps):
        if i == warmup:
            started = time.perf_counter()
        for a in range(t.gradient_accumulation_steps):
            batch = torch.from_numpy(blocks[np.sort(micro[i * t.gradient_accumulation_steps + a])].astype(np.int64))
            with device.autocast():
                logits = net(input_ids=batch[:, :-1]).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
            (loss / t.gradient_accumulation_steps).backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), t.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * t.tokens_per_step / (time.perf_counter() - started)


def run_trainer(cfg: config.RunConfig, corpus: data.Corpus, warmup: int, steps: int, bf16: bool) -> float:
    """transformers' Trainer on the same model and blocks (labels shifted inside the model)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    state.seed_everything(0)
    net = model.build(cfg.model, corpus.tokenizer)
    blocks, t = corpus.blocks("train"), cfg.train

    class Blocks(torch.utils.data.Dataset):
        def __len__(self):
            return len(blocks)

        def __getitem__(self, i):
            ids = torch.from_numpy(blocks[np.array([i])][0, :-1].astype(np.int64))
            return {"input_ids": ids, "labels": ids}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state_, control, **kwargs):
            if state_.global_step == warmup:
                self.started = time.perf_counter()

    clock = Clock()
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, max_steps=warmup + steps,
        learning_rate=t.learning_rate, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
        warmup_steps=t.warmup_steps, lr_scheduler_type="cosine", bf16=bf16, use_cpu=True,
        save_strategy="no", report_to=[], logging_steps=10_000, dataloader_num_workers=0,
        disable_tqdm=True)
    Trainer(model=net, args=args, train_dataset=Blocks(), callbacks=[clock]).train()
    return steps * t.tokens_per_step / (time.perf_counter() - clock.started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="smoke")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    rows = []
    for precision in ("fp32", "auto"):
        params = {**SIZES[args.size], "precision": precision, "output_dir": tempfile.mkdtemp(),
                  "max_steps": args.warmup + args.steps, "warmup_steps": 2, "eval_steps": args.warmup,
                  "save_steps": 10_000, "eval_blocks": 8, "resume_from_checkpoint": ""}
        cfg = resolve(params)
        vocab = cfg.model.vocab_size or 512
        corpus = make_corpus(cfg, vocab, blocks=(args.warmup + args.steps + 1) * cfg.train.global_batch)
        used = hardware.detect(precision).precision
        run_minimal(cfg, corpus, 1, 2)  # untimed: the first run of a process pays for allocator and kernel warm-up
        runners = {"nblib": lambda: run_nblib(cfg, corpus, args.warmup, args.steps),
                   "minimal loop": lambda: run_minimal(cfg, corpus, args.warmup, args.steps),
                   "Trainer": lambda: run_trainer(cfg, corpus, args.warmup, args.steps, used == "bf16")}
        for name, runner in runners.items():
            tokens_per_second = runner()
            mfu = tokens_per_second * flops_per_token(cfg, vocab) / peaks[used]
            row = dict(bench="throughput", size=args.size, runner=name, precision=used,
                       tokens_per_second=round(tokens_per_second, 1), mfu=round(mfu, 4),
                       peak_tflops={k: round(v / 1e12, 3) for k, v in peaks.items()})
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(f"\n{'runner':14} {'precision':9} {'tokens/s':>10} {'MFU':>7}")
    for r in rows:
        print(f"{r['runner']:14} {r['precision']:9} {r['tokens_per_second']:>10,.0f} {r['mfu']:>7.1%}")


if __name__ == "__main__":
    main()
