"""GPU acceptance: the Kaggle path on a real GPU, from one command, in under 8 minutes on one GPU.

    python bench/gpu_check.py                  # every check, on the first GPU
    python bench/gpu_check.py --only peak,oom,resume
    python bench/gpu_check.py --cpu-smoke      # the script itself on a CPU (the smoke shape), about a minute

Offline: it trains on the built-in corpus with a BPE trained here, padded to the GPT-2 vocabulary
(50257 rows), so the model is the kaggle-t4 shape without the Hub. Each check prints one JSON line
when it is done, with its own wall time; the last line on stdout is one JSON object holding every
check's result by name (a check that failed holds "error"; one that needs CUDA, on a CPU, holds
"skipped"). Every check but two_ranks trains in this process with devices=1, so the memory cap and
the memory readings act where the work runs. Checks:
  peak        matmul TFLOP/s per precision, measured as nblib.monitoring.mfu measures (on a GPU n=4096, the best
              of 50 synchronised timings), next to the datasheet figure nblib uses where it has one
  t4_shape    the kaggle-t4 model in the precision 'auto' picks: finite losses, tokens/s, MFU, peak memory
  fp16        the same forced to fp16, so any GPU runs the T4's path (GradScaler, chunked loss):
              finite losses, skipped steps, the final loss scale
  oom         memory capped with set_per_process_memory_fraction: a real CUDA OOM backed off
  resume      a run of 2 x steps against the same run resumed from its checkpoint at `steps` (found by
              name, whatever its epoch): the largest loss difference (0.0 is bitwise)
  compile     torch_compile=True against eager: tokens/s and the loss difference
  two_ranks   the same parameters on one process and on two: NCCL over two GPUs, or gloo over
              CUDA tensors with both ranks on one GPU

Tokens/s are the training loop's own: the history's last record, which counts the steps after the
evaluation before it (evaluations come every third of the run, so warm-up and compilation fall in
the first third), timed by the loop around each optimizer step, whose loss.item() waits for the GPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nblib import (
    data,  # noqa: E402
    model,  # noqa: E402
)
from nblib.monitoring import mfu  # noqa: E402
from nblib.setup import (
    hardware,  # noqa: E402
    params,  # noqa: E402
)
from nblib.setup.config import RunConfig  # noqa: E402
from nblib.training import (
    checkpoint,  # noqa: E402
    collectives,  # noqa: E402
    launch,  # noqa: E402
    loop,  # noqa: E402
    loss,  # noqa: E402
    state,  # noqa: E402
)

GPU_SHAPE = dict(preset="kaggle-t4", dataset="builtin:python-docs", dataset_config="", tokenizer="bpe:8192",
                 vocab_size=50257, eval_blocks=64, time_budget_minutes=0, resume_from_checkpoint="",
                 prompts=["Return the"], max_new_tokens=8)
CPU_SHAPE = dict(GPU_SHAPE, preset="smoke", tokenizer="bpe:512", vocab_size=None, eval_blocks=16)
CHECKS = ("peak", "t4_shape", "fp16", "oom", "resume", "compile", "two_ranks")
OOM_CAP_GB = 2.0  # the kaggle-t4 model at a micro-batch of 64 needs more; at 1, far less


class Runs:
    """Each run in its own output_dir, sharing one tokenized cache (tokenized once)."""

    def __init__(self, shape: dict, root: Path, steps: int):
        self.shape, self.root, self.steps, self.count = shape, root, steps, 0

    def run(self, world_size: int = 0, **overrides) -> tuple[loop.RunResult, RunConfig, hardware.Device]:
        """A run of `steps` with `overrides`, in this process (devices=1), or in `world_size`
        processes whatever the GPU count (two ranks may share one GPU over gloo, which the
        parameters refuse). Evaluations every third of the run, a checkpoint at its end."""
        self.count += 1
        out = self.root / f"run{self.count}"
        if (self.root / "run1" / "data_cache").is_dir() and not out.exists():
            shutil.copytree(self.root / "run1" / "data_cache", out / "data_cache")
        steps = overrides.pop("max_steps", self.steps)
        cfg = params.resolve({**self.shape, "devices": 1, "output_dir": str(out), "max_steps": steps,
                              "eval_steps": max(1, self.steps // 3), "save_steps": self.steps, **overrides})
        device = hardware.detect(cfg.train.precision, cfg.devices)
        device = dataclasses.replace(device, world_size=world_size) if world_size else device
        state.seed_everything(cfg.train.seed)
        corpus = data.prepare(cfg)
        return launch.fit(cfg, device, model.build(cfg.model, corpus.tokenizer), corpus), cfg, device


def number(value: float, digits: int = 4) -> float | None:
    """A figure for the JSON lines: rounded, or None where it is NaN or infinite."""
    return round(value, digits) if math.isfinite(value) else None


def throughput(result: loop.RunResult) -> dict:
    """Tokens/s of the history's last record, and how many steps they count."""
    records = result.history
    return dict(tokens_per_second=number(records[-1].tokens_per_second, 1),
                timed_steps=records[-1].step - (records[-2].step if len(records) > 1 else 0))


def losses(result: loop.RunResult) -> dict:
    step_losses = result.state.step_losses
    return dict(steps=result.state.step, finite_losses=sum(math.isfinite(x) for x in step_losses),
                skipped_steps=result.state.skipped_steps, final_loss=number(step_losses[-1]))


def largest_difference(a: list[float], b: list[float]) -> float | None:
    return number(max(abs(x - y) for x, y in zip(a, b, strict=True)), 8)


def check_peak(measured: Callable[[str], float], device: hardware.Device) -> dict:
    if device.is_cuda:
        capability = torch.cuda.get_device_capability(0)
        precisions = ["fp32", "fp16"] + (["bf16"] if capability >= (8, 0) else [])
    else:
        precisions = ["fp32", "bf16", "fp16"]
    datasheet = {p: mfu.datasheet_peak(device.gpu_name, p) for p in precisions}  # none for a CPU ("")
    return dict(measured_tflops={p: number(measured(p) / 1e12, 3) for p in precisions},
                datasheet_tflops={p: v / 1e12 for p, v in datasheet.items() if v})


def check_t4_shape(runs: Runs, measured: Callable[[str], float]) -> dict:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result, cfg, device = runs.run()
    rate = result.history[-1].tokens_per_second
    per_token = mfu.flops_per_token(cfg, result.state.model.config.vocab_size)
    return dict(precision=device.precision, global_batch=result.state.global_batch, **losses(result),
                **throughput(result), mfu=number(result.history[-1].mfu),
                mfu_source=mfu.peak_flops(device)[1],
                mfu_of_measured_peak=number(mfu.utilisation(rate, per_token, measured(device.precision), 1)),
                **hardware.peak_memory(device))


def check_fp16(runs: Runs) -> dict:
    result, _, device = runs.run(precision="fp16")
    scaler = result.state.scaler
    return dict(precision=device.precision, grad_scaler=scaler is not None,
                chunked_loss=loss.chunkable_head(result.state.model) is not None, **losses(result),
                loss_scale=scaler.get_scale() if scaler is not None else None, **throughput(result))


def check_oom(runs: Runs) -> dict:
    if not torch.cuda.is_available():
        return dict(skipped="needs CUDA")
    torch.cuda.set_per_process_memory_fraction(OOM_CAP_GB * 2**30 / torch.cuda.get_device_properties(0).total_memory)
    try:
        result, _, _ = runs.run(batch_size=64, gradient_accumulation_steps=1)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    return dict(cap_gb=OOM_CAP_GB, backed_off=bool(result.state.events), stop_reason=result.stop_reason.value,
                events=result.state.events, micro_batch=result.state.batch_size,
                accumulation=result.state.gradient_accumulation_steps, **losses(result))


def check_resume(runs: Runs) -> dict:
    whole, _, _ = runs.run(max_steps=2 * runs.steps)
    saved = dict(checkpoint.list_checkpoints(checkpoint.checkpoint_dir(whole.run_dir)))
    if runs.steps not in saved:
        raise RuntimeError(f"no checkpoint of step {runs.steps} in {whole.run_dir}: {sorted(saved)}")
    resumed, _, _ = runs.run(max_steps=2 * runs.steps, resume_from_checkpoint=str(saved[runs.steps]))
    difference = largest_difference(whole.state.step_losses, resumed.state.step_losses)
    return dict(resumed_from=saved[runs.steps].name, steps=len(resumed.state.step_losses),
                max_loss_difference=difference, bitwise=difference == 0.0)


def check_compile(runs: Runs) -> dict:
    eager, _, _ = runs.run()
    started = time.perf_counter()
    compiled, _, _ = runs.run(torch_compile=True)
    return dict(compiled_run_seconds=round(time.perf_counter() - started, 1),
                tokens_per_second={"eager": throughput(eager)["tokens_per_second"],
                                   "compiled": throughput(compiled)["tokens_per_second"]},
                max_loss_difference=largest_difference(eager.state.step_losses, compiled.state.step_losses))


def check_two_ranks(runs: Runs) -> dict:
    one, _, _ = runs.run()
    two, _, device = runs.run(world_size=2)
    return dict(backend=collectives.backend(device), global_batch=[one.state.global_batch, two.state.global_batch],
                max_loss_difference=largest_difference(one.state.step_losses, two.state.step_losses),
                tokens_per_second={"one": throughput(one)["tokens_per_second"],
                                   "two": throughput(two)["tokens_per_second"]})


def timed(name: str, check: Callable[[], dict]) -> dict:
    """The check's result with its wall time, printed as one JSON line; a failure becomes its
    "error", so that one failing check does not hide the others."""
    started = time.perf_counter()
    try:
        result = check()
    except Exception as error:  # any failure is this check's finding, not the script's end
        result = dict(error=f"{type(error).__name__}: {error}"[:500])
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps({"check": name, **result}), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(CHECKS), help=f"some of {', '.join(CHECKS)}")
    parser.add_argument("--steps", type=int, help="steps per run: 30, or 6 with --cpu-smoke (resume's: twice)")
    parser.add_argument("--cpu-smoke", action="store_true", help="a tiny model on the CPU: checks the script")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.cpu_smoke:
        sys.exit("no CUDA GPU here: run it on one (or --cpu-smoke to check the script)")
    wanted = args.only.split(",")
    unknown = sorted(set(wanted) - set(CHECKS))
    if unknown:
        parser.error(f"--only: unknown check(s) {', '.join(unknown)}; choose from {', '.join(CHECKS)}")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    started = time.perf_counter()
    device = hardware.detect("fp32", 1)
    measured = functools.partial(mfu.measured_peak, device.device.type)  # the figures training's MFU uses
    summary = {"device": dict(name=device.gpu_name or "cpu", count=torch.cuda.device_count(),
                              torch=torch.__version__, cpu_features=list(device.cpu_features))}
    print(json.dumps({"check": "device", **summary["device"]}), flush=True)
    runs = Runs(CPU_SHAPE if args.cpu_smoke else GPU_SHAPE, Path(tempfile.mkdtemp(prefix="gpu-check-")),
                steps=args.steps or (6 if args.cpu_smoke else 30))
    checks = {"peak": lambda: check_peak(measured, device), "t4_shape": lambda: check_t4_shape(runs, measured),
              "fp16": lambda: check_fp16(runs), "oom": lambda: check_oom(runs),
              "resume": lambda: check_resume(runs), "compile": lambda: check_compile(runs),
              "two_ranks": lambda: check_two_ranks(runs)}
    for name in CHECKS:
        if name in wanted:
            summary[name] = timed(name, checks[name])
    summary["wall_seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
