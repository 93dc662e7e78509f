"""The training loop: AdamW, warm-up + cosine, accumulation, clipping, evaluation and checkpoints."""
from __future__ import annotations

import enum
import logging
import math
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import checkpoint, files, stopping
from .config import RunConfig
from .data import Corpus
from .hardware import Device
from .state import TrainState

log = logging.getLogger(__name__)

MIN_LR_RATIO = 0.1  # cosine decays to a tenth of the peak, as nanoGPT does
SAVE_BYTES_PER_SECOND = 50e6  # a cautious disk speed, until the first save is timed


class StopReason(str, enum.Enum):
    COMPLETED = "completed"
    TIME_BUDGET = "time budget"
    INTERRUPTED = "interrupted"
    BAD_LOSS = "bad loss"
    OUT_OF_MEMORY = "out of memory at micro-batch 1"


@dataclass
class RunResult:
    state: TrainState
    stop_reason: StopReason
    run_dir: Path
    elapsed_seconds: float
    signal_name: str | None = None  # what interrupted the run, if anything

    @property
    def history(self) -> list[dict]:
        return self.state.history

    def describe(self) -> str:
        """What happened, and what to do next."""
        s = self.state
        facts = (f"{s.step} steps, {s.tokens_seen:,} tokens in {self.elapsed_seconds:.0f} s; best "
                 f"validation loss {s.best_val_loss:.4f} (perplexity {perplexity(s.best_val_loss):.1f})")
        resume = "resume with resume_from_checkpoint='auto'"
        advice = {
            StopReason.COMPLETED: "completed",
            StopReason.TIME_BUDGET: f"stopped at the time budget; {resume}",
            StopReason.INTERRUPTED: (f"interrupted by {self.signal_name}: saved "
                                     f"{self.run_dir / checkpoint.EMERGENCY}; {resume}"),
        }
        return f"{advice.get(self.stop_reason, self.stop_reason.value)}: {facts}"


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the peak learning rate at `step`: linear warm-up, then cosine decay."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress))


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def total_steps(cfg: RunConfig, n_train_blocks: int) -> int:
    """`max_steps`, or `epochs` full passes when it is 0."""
    per_epoch = n_train_blocks // cfg.train.effective_batch
    if per_epoch == 0:
        raise ValueError(f"the training split has {n_train_blocks} blocks of max_length="
                         f"{cfg.train.max_length}, fewer than one optimizer step's "
                         f"{cfg.train.effective_batch}: lower batch_size, "
                         "gradient_accumulation_steps or max_length, or use more data")
    return cfg.train.max_steps or cfg.train.epochs * per_epoch


def build_optimizer(model: torch.nn.Module, cfg: RunConfig, device: Device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not biases, norms); fused on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.train.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.train.learning_rate, betas=(0.9, 0.95),
                             fused=device.is_cuda)


def new_state(cfg: RunConfig, device: Device, model: torch.nn.Module, steps: int) -> TrainState:
    model.to(device.device)
    optimizer = build_optimizer(model, cfg, device)
    schedule = partial(lr_factor, warmup_steps=cfg.train.warmup_steps, total_steps=steps)
    return TrainState(
        model=model, optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, schedule),
        scaler=torch.amp.GradScaler(device.device.type) if device.uses_grad_scaler else None,
        batch_size=cfg.train.batch_size,
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps)


def epoch_order(n_blocks: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled block order of one epoch: a pure function of seed and epoch."""
    return np.random.default_rng([seed, epoch]).permutation(n_blocks)


def next_step_blocks(state: TrainState, n_blocks: int, seed: int, effective_batch: int) -> np.ndarray:
    """Indices of the blocks for the next optimizer step; moves the data position on."""
    if state.position + effective_batch > n_blocks:  # the epoch's remainder is dropped
        state.epoch, state.position = state.epoch + 1, 0
    order = epoch_order(n_blocks, seed, state.epoch)
    indices = order[state.position: state.position + effective_batch]
    state.position += effective_batch
    return indices


def to_batch(blocks: np.ndarray, device: Device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T+1) token blocks -> inputs and targets, each (B, T) int64 on the device."""
    tokens = torch.from_numpy(blocks.astype(np.int64))
    if device.is_cuda:
        tokens = tokens.pin_memory().to(device.device, non_blocking=True)
    return tokens[:, :-1], tokens[:, 1:]


def loss_of(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, device: Device) -> torch.Tensor:
    with device.autocast():
        logits = model(input_ids=inputs).logits  # (B, T, V)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def optimizer_step(state: TrainState, blocks: np.ndarray, device: Device, max_grad_norm: float) -> tuple[float, float] | None:
    """One optimizer step over `blocks`, in micro-batches of `state.batch_size`.

    Returns (mean loss, gradient norm), or None when the step was skipped because the loss
    or the gradient norm was not finite.
    """
    model, optimizer = state.model, state.optimizer
    model.train()
    micro_batches = np.array_split(blocks, state.gradient_accumulation_steps)
    loss_sum = torch.zeros((), device=device.device)  # summed on the device: no sync per micro-step
    for micro in micro_batches:
        inputs, targets = to_batch(micro, device)
        loss = loss_of(model, inputs, targets, device) * (len(micro) / len(blocks))
        (state.scaler.scale(loss) if state.scaler else loss).backward()
        loss_sum += loss.detach()
    if state.scaler:
        state.scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    loss_value, norm_value = loss_sum.item(), grad_norm.item()
    finite = math.isfinite(loss_value) and math.isfinite(norm_value)
    if state.scaler:
        state.scaler.step(optimizer)  # skips the update itself on inf/nan gradients
        state.scaler.update()
    elif finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    state.scheduler.step()
    return (loss_value, norm_value) if finite else None


@torch.no_grad()
def evaluate(model: torch.nn.Module, blocks: np.ndarray, device: Device, batch_size: int,
             max_batches: int | None = None) -> float:
    """Mean loss over the first `max_batches` batches of `blocks` (the same subset every time;
    None: all of them)."""
    model.eval()
    n = len(blocks) if max_batches is None else min(len(blocks), batch_size * max_batches)
    total, count = torch.zeros((), device=device.device), 0
    for start in range(0, n, batch_size):
        inputs, targets = to_batch(blocks[start:start + batch_size], device)
        total += loss_of(model, inputs, targets, device) * len(inputs)
        count += len(inputs)
    return (total / max(count, 1)).item()


def run(cfg: RunConfig, device: Device, model: torch.nn.Module, corpus: Corpus) -> RunResult:
    """Train `model` on `corpus` as `cfg` says, resuming when asked; returns the outcome.

    Writes checkpoints, `best_model.pt` and `training_history.json` under `cfg.output_dir`.
    Stops early, with a checkpoint to resume from, on SIGINT/SIGTERM or at the time budget.
    """
    run_dir = cfg.output_dir
    for directory in (run_dir, checkpoint.checkpoint_dir(run_dir)):
        files.remove_temporaries(directory)
    train_blocks, val_blocks = corpus.blocks("train"), corpus.blocks("validation")
    steps = total_steps(cfg, len(train_blocks))
    state = new_state(cfg, device, model, steps)
    config = cfg.to_dict()
    _resume(state, cfg, config)
    _check_disk_budget(state, cfg)
    files.write_json(run_dir / "run_config.json", config)

    budget = stopping.TimeBudget(cfg.train.time_budget_minutes, cfg.started_at,
                                 save_seconds=checkpoint_bytes(model) / SAVE_BYTES_PER_SECOND)
    interrupt = stopping.InterruptFlag()
    window, started, reason = _Window(state.tokens_seen), time.perf_counter(), StopReason.COMPLETED
    with interrupt.installed(), tqdm(total=steps, initial=state.step, desc="training", unit="step",
                                     mininterval=2.0, dynamic_ncols=True) as bar:
        while state.step < steps:
            if interrupt:  # between steps: the state is whole
                reason = StopReason.INTERRUPTED
                checkpoint.save(run_dir / checkpoint.EMERGENCY, state.state_dict(config))
                break
            if budget.exhausted():
                reason = StopReason.TIME_BUDGET
                _save_checkpoint(state, cfg, config)
                break
            indices = next_step_blocks(state, len(train_blocks), cfg.train.seed, cfg.train.effective_batch)
            outcome = optimizer_step(state, train_blocks[np.sort(indices)], device, cfg.train.max_grad_norm)
            state.step += 1
            state.tokens_seen += len(indices) * cfg.train.max_length
            state.step_losses.append(outcome[0] if outcome else math.nan)
            if outcome:
                window.losses.append(outcome[0])
                bar.set_postfix(_progress(state, outcome, window, device), refresh=False)
            bar.update()
            if state.step % cfg.train.eval_steps == 0 or state.step == steps:
                _evaluate_and_record(state, cfg, config, device, val_blocks, window, started, steps)
            if state.step % cfg.train.save_steps == 0 or state.step == steps:
                budget.save_took(_save_checkpoint(state, cfg, config))
            budget.step_done()
    return RunResult(state, reason, run_dir, time.perf_counter() - started, interrupt.signal_name)


def _resume(state: TrainState, cfg: RunConfig, config: dict) -> None:
    resumed = checkpoint.find_resume(cfg.output_dir, cfg.resume_from_checkpoint)
    if resumed:
        path, saved = resumed
        checkpoint.check_compatible(saved, config, path)
        state.load_state_dict(saved)
        log.info("resumed from %s at step %d (epoch %d, block %d of its order)",
                 path, state.step, state.epoch, state.position)


def checkpoint_bytes(model: torch.nn.Module) -> int:
    """About what one checkpoint weighs: weights and AdamW's two moments, all fp32."""
    return 3 * sum(p.numel() * p.element_size() for p in model.parameters()) + 2**20


def _check_disk_budget(state: TrainState, cfg: RunConfig) -> None:
    """Print the projected peak disk use and refuse a run that cannot fit."""
    per_checkpoint = checkpoint_bytes(state.model)
    weights = per_checkpoint // 3
    # while rotating, one more checkpoint than kept exists; plus best, emergency and the export
    peak = (cfg.train.max_checkpoints + 3) * per_checkpoint + weights
    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    reusable = sum(p.stat().st_size for p in checkpoint.existing_files(cfg.output_dir))
    free = shutil.disk_usage(cfg.output_dir).free + reusable
    log.info("disk: about %.0f MB per checkpoint, projected peak %.2f GB, %.1f GB available in %s",
             per_checkpoint / 2**20, peak / 2**30, free / 2**30, cfg.output_dir)
    if peak > free:
        raise OSError(28, f"this run would need about {peak / 2**30:.2f} GB in {cfg.output_dir} "
                      f"({cfg.train.max_checkpoints} checkpoints of {per_checkpoint / 2**20:.0f} MB "
                      f"plus best, emergency and final model), but only {free / 2**30:.2f} GB are "
                      "free: lower max_checkpoints or free space")


class _Window:
    """Training losses and throughput since the last evaluation."""

    def __init__(self, tokens_seen: int):
        self.losses: list[float] = []
        self.tokens, self.time = tokens_seen, time.perf_counter()

    def tokens_per_second(self, tokens_seen: int) -> float:
        return (tokens_seen - self.tokens) / max(time.perf_counter() - self.time, 1e-9)

    def reset(self, tokens_seen: int) -> None:
        self.__init__(tokens_seen)


def _progress(state: TrainState, outcome: tuple[float, float], window: _Window, device: Device) -> dict:
    shown = {"loss": f"{outcome[0]:.3f}", "lr": f"{state.scheduler.get_last_lr()[0]:.2e}",
             "grad_norm": f"{outcome[1]:.2f}",
             "tok/s": f"{window.tokens_per_second(state.tokens_seen):,.0f}"}
    if device.is_cuda:
        shown["mem"] = f"{torch.cuda.max_memory_allocated() / 2**30:.1f}GB"
    return shown


def _evaluate_and_record(state: TrainState, cfg: RunConfig, config: dict, device: Device,
                         val_blocks: np.ndarray, window: _Window, started: float, total: int) -> None:
    """Validation loss into the history (one record per evaluation); a new best is saved."""
    state.val_loss = evaluate(state.model, val_blocks, device, state.batch_size, cfg.train.eval_batches)
    state.train_loss = float(np.mean(window.losses)) if window.losses else math.nan
    state.history.append({
        "epoch": state.epoch, "step": state.step, "tokens_seen": state.tokens_seen,
        "train_loss": state.train_loss, "val_loss": state.val_loss,
        "val_perplexity": perplexity(state.val_loss),
        "learning_rate": state.scheduler.get_last_lr()[0],
        "tokens_per_second": window.tokens_per_second(state.tokens_seen),
        "elapsed_seconds": time.perf_counter() - started,
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    window.reset(state.tokens_seen)
    record = state.history[-1]
    log.info("step %d/%d: train loss %.4f, val loss %.4f (perplexity %.1f), lr %.2e, %.0f tokens/s, "
             "%.0f s", state.step, total, state.train_loss, state.val_loss, record["val_perplexity"],
             record["learning_rate"], record["tokens_per_second"], record["elapsed_seconds"])
    files.write_json(cfg.output_dir / "training_history.json", state.history)
    if math.isfinite(state.val_loss) and state.val_loss < state.best_val_loss:
        state.best_val_loss = state.val_loss
        checkpoint.save(cfg.output_dir / checkpoint.BEST_MODEL, state.state_dict(config))


def _save_checkpoint(state: TrainState, cfg: RunConfig, config: dict) -> float:
    """Checkpoint this step (once), rotate, and drop the emergency checkpoint it supersedes."""
    path = checkpoint.checkpoint_path(cfg.output_dir, state.epoch, state.step)
    if path.exists():
        return 0.0
    seconds = checkpoint.save(path, state.state_dict(config))
    checkpoint.rotate(path.parent, cfg.train.max_checkpoints)
    (cfg.output_dir / checkpoint.EMERGENCY).unlink(missing_ok=True)
    return seconds
