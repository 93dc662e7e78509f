"""GPU acceptance: the Kaggle path on a real GPU, one JSON line per check, in under 10 minutes.

    python bench/gpu_check.py                  # every check, on the first GPU(s)
    python bench/gpu_check.py --only oom,resume
    python bench/gpu_check.py --cpu-smoke      # the script itself on a CPU (tiny model), for CI-less checking

Offline: it trains on the built-in corpus with a BPE trained here, padded to the GPT-2 vocabulary
(50257 rows), so the model is the kaggle-t4 shape without the Hub. Checks:
  peak        fp16 (and bf16 where fast) 4096x4096 matmul TFLOP/s, the MFU reference
  t4_shape    the kaggle-t4 model in the precision 'auto' picks (fp16 + GradScaler on a T4):
              finite losses, tokens/s, MFU, peak memory
  oom         memory capped with set_per_process_memory_fraction: a real CUDA OOM backed off
  resume      20 steps against 10 + a resume of 10: the largest loss difference (0.0 is bitwise)
  compile     torch_compile=True against eager: tokens/s and the loss difference
  two_ranks   the same parameters on one process and on two: NCCL over two GPUs, or gloo over
              CUDA tensors with both ranks on one GPU
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nblib import collectives, config, data, hardware, launch, model, params, state, train  # noqa: E402
from nblib.mfu import flops_per_token, matmul_peak  # noqa: E402

GPU_SHAPE = dict(preset="kaggle-t4", dataset="builtin:python-docs", dataset_config="", tokenizer="bpe:8192",
                 vocab_size=50257, eval_blocks=64, time_budget_minutes=0, resume_from_checkpoint="",
                 prompts=["Return the"], max_new_tokens=8)
CPU_SHAPE = dict(GPU_SHAPE, preset="smoke", tokenizer="bpe:512", vocab_size=None, eval_blocks=16)


def emit(check: str, **facts) -> dict:
    line = {"check": check, **facts}
    print(json.dumps(line), flush=True)
    return line


class Runs:
    """Each run in its own output_dir, sharing one tokenized cache (tokenized once)."""

    def __init__(self, shape: dict, root: Path):
        self.shape, self.root, self.count = shape, root, 0

    def run(self, world_size: int = 0, **overrides) -> tuple[train.RunResult, config.RunConfig]:
        """A run with `overrides`; `world_size` processes whatever the GPU count (two ranks may
        share one GPU over gloo, which the parameters refuse)."""
        self.count += 1
        out = self.root / f"run{self.count}"
        if (self.root / "run1" / "data_cache").is_dir() and not out.exists():
            shutil.copytree(self.root / "run1" / "data_cache", out / "data_cache")
        cfg = params.resolve({**self.shape, "output_dir": str(out), **overrides})
        device = hardware.detect(cfg.train.precision, cfg.devices)
        device = dataclasses.replace(device, world_size=world_size) if world_size else device
        state.seed_everything(cfg.train.seed)
        corpus = data.prepare(cfg)
        return launch.fit(cfg, device, model.build(cfg.model, corpus.tokenizer), corpus), cfg


def check_t4_shape(runs: Runs, steps: int, peak: dict) -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result, cfg = runs.run(max_steps=steps, eval_steps=steps, save_steps=steps)
    record = result.history[-1]
    precision = hardware.detect(cfg.train.precision).precision
    rate = record["tokens_per_second"]
    emit("t4_shape", precision=precision, steps=result.state.step, global_batch=result.state.global_batch,
         finite=all(x == x for x in result.state.step_losses), final_loss=record["train_loss"],
         tokens_per_second=round(rate), skipped=result.state.skipped_steps,
         mfu=round(rate * flops_per_token(cfg, result.state.model.config.vocab_size)
                   / peak.get(precision, peak["fp32"]), 4),
         max_memory_gb=round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None)


def check_oom(runs: Runs, steps: int) -> None:
    if not torch.cuda.is_available():
        return emit("oom", skipped="needs CUDA")
    cap_gb = 3.0
    torch.cuda.set_per_process_memory_fraction(cap_gb * 2**30 / torch.cuda.get_device_properties(0).total_memory)
    try:
        result, _ = runs.run(max_steps=steps, eval_steps=steps, save_steps=steps, batch_size=64,
                               gradient_accumulation_steps=1)
        emit("oom", cap_gb=cap_gb, stop_reason=result.stop_reason.value, events=result.state.events,
             micro_batch=result.state.batch_size, accumulation=result.state.gradient_accumulation_steps)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()


def check_resume(runs: Runs, steps: int) -> None:
    whole, _ = runs.run(max_steps=2 * steps, eval_steps=steps, save_steps=steps)
    half = runs.root / f"run{runs.count}" / "checkpoints" / f"checkpoint_epoch0_step{steps}.pt"
    resumed, _ = runs.run(max_steps=2 * steps, eval_steps=steps, save_steps=steps, resume_from_checkpoint=str(half))
    differences = [abs(a - b) for a, b in zip(whole.state.step_losses, resumed.state.step_losses)]
    emit("resume", steps=len(differences), max_loss_difference=max(differences), bitwise=max(differences) == 0.0)


def check_compile(runs: Runs, steps: int) -> None:
    eager, _ = runs.run(max_steps=steps, eval_steps=steps, save_steps=steps)
    started = time.perf_counter()
    compiled, _ = runs.run(max_steps=steps, eval_steps=steps, save_steps=steps, torch_compile=True)
    emit("compile", wall_seconds=round(time.perf_counter() - started, 1),
         tokens_per_second={"eager": round(eager.history[-1]["tokens_per_second"]),
                            "compiled": round(compiled.history[-1]["tokens_per_second"])},
         max_loss_difference=max(abs(a - b) for a, b in zip(eager.state.step_losses, compiled.state.step_losses)))


def check_two_ranks(runs: Runs, steps: int) -> None:
    one, _ = runs.run(max_steps=steps, eval_steps=steps, save_steps=steps, devices=1)
    two, cfg = runs.run(world_size=2, max_steps=steps, eval_steps=steps, save_steps=steps)
    device = dataclasses.replace(hardware.detect(cfg.train.precision, 1), world_size=2)
    emit("two_ranks", backend=collectives.backend(device), global_batch=[one.state.global_batch, two.state.global_batch],
         max_loss_difference=max(abs(a - b) for a, b in zip(one.state.step_losses, two.state.step_losses)),
         tokens_per_second={"one": round(one.history[-1]["tokens_per_second"]),
                            "two": round(two.history[-1]["tokens_per_second"])})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="peak,t4_shape,oom,resume,compile,two_ranks")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--cpu-smoke", action="store_true", help="a tiny model on the CPU: checks the script")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.cpu_smoke:
        sys.exit("no CUDA GPU here: run it on one (or --cpu-smoke to check the script)")
    wanted = args.only.split(",")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    emit("device", name=torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
         count=torch.cuda.device_count(), torch=torch.__version__)
    peak = {"fp32": matmul_peak(torch.float32, device, n=1024 if device == "cpu" else 4096)}
    if device == "cuda":
        peak["fp16"] = matmul_peak(torch.float16, device)
        if torch.cuda.get_device_capability(0) >= (8, 0):
            peak["bf16"] = matmul_peak(torch.bfloat16, device)
    if "peak" in wanted:
        emit("peak", tflops={k: round(v / 1e12, 2) for k, v in peak.items()})
    runs = Runs(CPU_SHAPE if args.cpu_smoke else GPU_SHAPE, Path(tempfile.mkdtemp(prefix="gpu-check-")))
    steps = 4 if args.cpu_smoke else args.steps
    for name, check in (("t4_shape", lambda: check_t4_shape(runs, steps, peak)),
                        ("oom", lambda: check_oom(runs, steps)), ("resume", lambda: check_resume(runs, steps)),
                        ("compile", lambda: check_compile(runs, steps)),
                        ("two_ranks", lambda: check_two_ranks(runs, steps))):
        if name in wanted:
            started = time.perf_counter()
            try:
                check()
            except Exception as error:  # one failing check must not hide the others' lines
                emit(name, error=f"{type(error).__name__}: {error}"[:500])
            print(f"# {name}: {time.perf_counter() - started:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
