"""Training throughput: nblib's loop against a minimal PyTorch loop and transformers' Trainer.

Same model, data, micro-batch, accumulation and precision, on one device (the first GPU where
there is one, else the CPU); tokens/s measured after warm-up steps, with the GPU synchronised; model
FLOPs utilisation against the device's matmul peak in that precision, measured in the same process
(nblib.monitoring.mfu.measured_peak: on a GPU n=4096, the best of 50 timings).

    python bench/throughput.py [--size smoke|bar|guide|guide-256|guide-512] [--steps 12] [--warmup 3]
                               [--precisions fp32,auto] [--repeats 3]

Each runner runs in a process of its own (so its peak resident memory is its own), which sees one
GPU only (Trainer would spread over all of them with DataParallel). Prints one JSON line per
measurement, then a short table. Trainer needs `pip install accelerate`.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import GPT2LMHeadModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nblib import (
    data,  # noqa: E402
    model,  # noqa: E402
)
from nblib.data import tokenizer  # noqa: E402
from nblib.monitoring.mfu import flops_per_token, measured_peak, shown, utilisation  # noqa: E402
from nblib.setup import (
    config,  # noqa: E402
    hardware,  # noqa: E402
)
from nblib.setup.params import resolve  # noqa: E402
from nblib.training import (
    loop,  # noqa: E402
    optimization,  # noqa: E402
    state,  # noqa: E402
)

SIZES = {  # the smoke preset's model, cpu-demo's at issue 15's bar, and the guide's at T=128/256/512
    "smoke": dict(preset="smoke", vocab_size=512, batch_size=16, gradient_accumulation_steps=1),
    "bar": dict(preset="cpu-demo", vocab_size=4096, max_length=256, batch_size=8, gradient_accumulation_steps=1),
    "guide": dict(preset="kaggle-t4", max_length=128, batch_size=8, gradient_accumulation_steps=1),
    "guide-256": dict(preset="kaggle-t4", max_length=256, batch_size=8, gradient_accumulation_steps=1),
    "guide-512": dict(preset="kaggle-t4", max_length=512, batch_size=8, gradient_accumulation_steps=1),
}


def make_corpus(cfg: config.RunConfig, vocab: int, blocks: int) -> data.Corpus:
    rng = np.random.default_rng(0)
    flat = rng.integers(0, vocab - 1, size=blocks * (cfg.train.max_length + 1)).astype(np.uint16)
    tokens = {"train": flat, "validation": flat[: 4 * (cfg.train.max_length + 1)], "test": flat[:1]}
    # Random ids over the model's vocabulary; a small real tokenizer for the samples and the fingerprint.
    small = tokenizer.train_bpe(["the river city was built in the north by an old king"] * 50, 300)
    return data.Corpus(small, Path(tempfile.mkdtemp()), tokens, cfg.train.max_length)


def plain_gpt2(cfg: config.RunConfig, corpus: data.Corpus) -> GPT2LMHeadModel:
    """The same GPT-2 (padded vocabulary included) with transformers' own modules, as a user's
    loop builds it: without nblib's fused GELU (model.fused_gelu)."""
    return GPT2LMHeadModel(model.gpt2_config(cfg.model, corpus.tokenizer))


def synchronize(device: hardware.Device) -> None:
    if device.is_cuda:
        torch.cuda.synchronize(device.device)


def run_nblib(cfg: config.RunConfig, corpus: data.Corpus, warmup: int, steps: int) -> float:
    """tokens/s of train.run over the steps after `warmup`: the history's records after the first
    (evaluations every `warmup` steps; each record times its own steps, without the evaluation)."""
    state.seed_everything(0)
    net = model.build(cfg.model, corpus.tokenizer)
    result = loop.run(cfg, hardware.detect(cfg.train.precision, 1), net, corpus)
    records = result.history
    tokens = [(r.step - before.step) * cfg.train.tokens_per_step for before, r in zip(records, records[1:])]
    return sum(tokens) / sum(n / r.tokens_per_second for n, r in zip(tokens, records[1:]))


def run_minimal(cfg: config.RunConfig, corpus: data.Corpus, warmup: int, steps: int,
                own_loss: bool = False) -> float:
    """The same model and optimizer in a bare nanoGPT-style loop: no logging, no checkpoints.
    `own_loss`: transformers' loss (`labels=`) instead of a cross-entropy over the logits."""
    state.seed_everything(0)
    device = hardware.detect(cfg.train.precision, 1)
    net = plain_gpt2(cfg, corpus).to(device.device)
    opt = optimization.build_optimizer(net, cfg)
    scaler = torch.amp.GradScaler(device.device.type) if device.uses_grad_scaler else None  # as a user's fp16 loop
    blocks, t = corpus.blocks("train"), cfg.train
    n_micro = (warmup + steps) * t.gradient_accumulation_steps
    micro = np.random.default_rng(0).permutation(len(blocks))[: n_micro * t.batch_size].reshape(n_micro, -1)
    net.train()
    for i in range(warmup + steps):
        if i == warmup:
            synchronize(device)
            started = time.perf_counter()
        for a in range(t.gradient_accumulation_steps):
            batch = torch.from_numpy(blocks[np.sort(micro[i * t.gradient_accumulation_steps + a])].astype(np.int64))
            batch = batch.to(device.device, non_blocking=True)
            with device.autocast():
                if own_loss:
                    loss = net(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
                else:
                    logits = net(input_ids=batch[:, :-1]).logits
            if not own_loss:
                loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
            loss = loss / t.gradient_accumulation_steps
            (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(net.parameters(), t.max_grad_norm)
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
    synchronize(device)
    return steps * t.tokens_per_step / (time.perf_counter() - started)


def run_trainer(cfg: config.RunConfig, corpus: data.Corpus, warmup: int, steps: int) -> float:
    """transformers' Trainer on the same model and blocks (labels shifted inside the model), on
    the GPU where there is one; fp16 with its GradScaler, or bf16, as nblib's precision."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    state.seed_everything(0)
    device = hardware.detect(cfg.train.precision, 1)
    net = plain_gpt2(cfg, corpus)
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
                synchronize(device)
                self.started = time.perf_counter()

    clock = Clock()
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, max_steps=warmup + steps,
        learning_rate=t.learning_rate, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
        warmup_steps=t.warmup_steps, lr_scheduler_type="cosine", bf16=device.precision == "bf16",
        fp16=device.precision == "fp16", use_cpu=not device.is_cuda,
        save_strategy="no", report_to=[], logging_steps=10_000, dataloader_num_workers=0,
        disable_tqdm=True)
    Trainer(model=net, args=args, train_dataset=Blocks(), callbacks=[clock]).train()
    synchronize(device)
    return steps * t.tokens_per_step / (time.perf_counter() - clock.started)


RUNNERS = ("nblib", "minimal loop", "labels= loop", "Trainer")


def measure(size: str, precision: str, runner: str, warmup: int, steps: int) -> dict:
    """One runner in this process: tokens/s, MFU against the matmul peak measured here, and the
    process's peak resident memory (and on a GPU, the peak its tensors took)."""
    params = {**SIZES[size], "precision": precision, "devices": 1, "output_dir": tempfile.mkdtemp(),
              "max_steps": warmup + steps, "warmup_steps": 2, "eval_steps": warmup,
              "save_steps": 10_000, "eval_blocks": 8, "resume_from_checkpoint": ""}
    cfg = resolve(params)
    vocab = cfg.model.vocab_size or 512
    corpus = make_corpus(cfg, vocab, blocks=(warmup + steps + 1) * cfg.train.global_batch)
    device = hardware.detect(precision, 1)
    used = device.precision
    peak = measured_peak(device.device.type, used)  # before training: each runner's process measures it alike
    tokens_per_second = {"nblib": lambda: run_nblib(cfg, corpus, warmup, steps),
                         "minimal loop": lambda: run_minimal(cfg, corpus, warmup, steps),
                         "labels= loop": lambda: run_minimal(cfg, corpus, warmup, steps, own_loss=True),
                         "Trainer": lambda: run_trainer(cfg, corpus, warmup, steps)}[runner]()
    memory = hardware.peak_memory(device)
    return dict(bench="throughput", size=size, runner=runner, device=device.gpu_name or "cpu", precision=used,
                tokens_per_second=round(tokens_per_second, 1),
                mfu=round(utilisation(tokens_per_second, flops_per_token(cfg, vocab), peak, 1), 4),  # NaN above 1
                max_rss_gb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
                max_gpu_memory_gb=memory.get("peak_gpu_memory_gb"),
                peak_tflops={used: round(peak / 1e12, 3)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="smoke")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--precisions", default="fp32,auto")
    parser.add_argument("--runners", default=",".join(RUNNERS), help=f"some of {', '.join(RUNNERS)}")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of every runner; the table shows medians")
    parser.add_argument("--runner", choices=RUNNERS, help="measure this one here (the others: a process each)")
    args = parser.parse_args()
    if args.runner:
        print(json.dumps(measure(args.size, args.precisions, args.runner, args.warmup, args.steps)), flush=True)
        return
    runs: dict[tuple[str, str], list[dict]] = {}
    first_gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": first_gpu}  # one GPU: Trainer would take all
    for _ in range(args.repeats):  # the runners take turns, so a slow spell of the machine hits all
        for precision in args.precisions.split(","):
            for runner in args.runners.split(","):  # a fresh process each: its peak memory is its own
                out = subprocess.run([sys.executable, __file__, "--size", args.size, "--steps", str(args.steps),
                                      "--warmup", str(args.warmup), "--precisions", precision, "--runner", runner],
                                     capture_output=True, text=True, check=True, env=env).stdout
                row = json.loads(out.strip().splitlines()[-1])
                runs.setdefault((precision, runner), []).append(row)
                print(json.dumps(row), flush=True)
    print(f"\n{'runner':14} {'precision':9} {'tokens/s':>10} {'MFU':>7} {'peak RSS':>9}  (median of {args.repeats})")
    for rows in runs.values():
        median = sorted(rows, key=lambda r: r["tokens_per_second"])[len(rows) // 2]
        print(f"{median['runner']:14} {median['precision']:9} {median['tokens_per_second']:>10,.0f} "
              f"{shown(median['mfu']):>7} {median['max_rss_gb']:>7.2f} GB")


if __name__ == "__main__":
    main()
