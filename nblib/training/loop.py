"""The training loop: AdamW, warm-up + cosine, accumulation, clipping, evaluation and checkpoints."""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from datetime import datetime, timezone

import numpy as np
import torch

from nblib import files, history
from nblib.console import ConfigError
from nblib.data.cache import Corpus
from nblib.evaluation import hellaswag
from nblib.evaluation.validation import evaluate
from nblib.export import generate
from nblib.model.gpt2 import weights_are_finite
from nblib.monitoring import mfu, progress, report
from nblib.setup.config import RunConfig
from nblib.setup.hardware import Device, peak_memory
from nblib.training import checkpoint, collectives, contract, oom, planning, stopping
from nblib.training.optimization import StepStats, new_state, optimizer_step
from nblib.training.result import RunResult, StopReason  # noqa: F401 (launch reads loop.RunResult and loop.StopReason)
from nblib.training.state import TrainState, capture_rng, global_batch_of

log = logging.getLogger(__name__)

clock = time.perf_counter  # the loop's timer (seconds); the tests hand it a fake one
SAVE_BYTES_PER_SECOND = 50e6  # a cautious disk speed, until the first save is timed
CLOCK_AFTER_STEPS = 5  # the session clock's first forecast, from this many timed steps


def total_steps(cfg: RunConfig, n_train_blocks: int, global_batch: int) -> int:
    """`max_steps`, or `epochs` full passes of `global_batch` blocks per step when it is 0."""
    per_epoch = n_train_blocks // global_batch
    if per_epoch == 0:
        raise ConfigError(f"the training split has {n_train_blocks} blocks of max_length="
                         f"{cfg.train.max_length}, fewer than one optimizer step's "
                         f"{global_batch}: lower batch_size, gradient_accumulation_steps "
                         "or max_length, or use more data")
    return cfg.train.max_steps or cfg.train.epochs * per_epoch


@functools.lru_cache(maxsize=2)  # computed once per epoch, not once per step
def epoch_order(n_blocks: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled block order of one epoch: a pure function of seed and epoch."""
    order = np.random.default_rng([seed, epoch]).permutation(n_blocks)
    order.setflags(write=False)  # shared by every caller through the cache
    return order


def step_blocks(n_blocks: int, seed: int, epoch: int, position: int, count: int) -> tuple[np.ndarray, int, int]:
    """The next `count` block indices from (epoch, position), and the (epoch, position) after."""
    if position + count > n_blocks:  # the epoch's remainder is dropped
        epoch, position = epoch + 1, 0
    return epoch_order(n_blocks, seed, epoch)[position: position + count], epoch, position + count


def run(cfg: RunConfig, device: Device, model: torch.nn.Module, corpus: Corpus) -> RunResult:
    """Train `model` on `corpus` as `cfg` says, resuming when asked; returns how it ended.

    Writes checkpoints, `best_model.pt` and `training_history.json` under `cfg.output_dir`.
    Stops early with a checkpoint to resume from: on SIGINT/SIGTERM, at the time budget, after
    `max_bad_steps` non-finite losses in a row, or when even a micro-batch of 1 is out of memory.
    In a data-parallel worker (started by `launch`) it trains this rank's share.

    Raises:
        contract.RunMismatch: the checkpoint to resume belongs to another run.
    """
    run_dir, t = cfg.output_dir, cfg.train
    if device.is_main:
        for directory in (run_dir, checkpoint.checkpoint_dir(run_dir)):
            files.remove_temporaries(directory)
    train_blocks = corpus.blocks("train")
    val_blocks = corpus.blocks("validation")[: t.eval_blocks]  # the same blocks at every evaluation
    config = {**cfg.to_dict(), "fingerprint": contract.fingerprint(cfg, corpus)}
    resumed = contract.find(cfg, device.world_size, corpus)
    global_batch = global_batch_of(resumed[1]) if resumed else t.global_batch
    steps = total_steps(cfg, len(train_blocks), global_batch)
    state = new_state(cfg, device, model, steps)
    if resumed:
        contract.resume(state, *resumed, cfg, device.world_size)
    steps = state.schedule.total_steps  # this run's length (a fitted run's: the plan its checkpoint kept)
    if device.is_main:
        checkpoint.check_disk_budget(run_dir, model, t.max_checkpoints)
        files.write_json(run_dir / "run_config.json", config)

    budget = stopping.TimeBudget(t.time_budget_minutes, cfg.started_at,
                                 save_seconds=checkpoint.projected_bytes(model) / SAVE_BYTES_PER_SECOND)
    interrupt = stopping.InterruptFlag(escalate=not collectives.in_worker())
    reporter = report.open_reporter(cfg.report_to, run_dir, config) if device.is_main else report.Reporter()
    ctx = _Run(cfg, config, device, val_blocks, corpus.tokenizer, corpus.is_chat, reporter,
               clock(), budget, mfu.flops_per_token(cfg, model.config.vocab_size),
               mfu.peak_flops(device)[0])
    first_step, first_tokens = state.step, state.tokens_seen
    window, reason, live, plan = progress.Window(), StopReason.COMPLETED, progress.Curves(), None
    fit_at = first_step + planning.FIT_AFTER_STEPS if t.fit_to_budget and state.planned_steps is None else None
    if state.step < steps:
        budget.refuse_if_spent()
    with interrupt.installed(), progress.bar(steps, state.step, disable=not device.is_main) as bar:
        while state.step < steps:
            began = clock()
            interrupted, out_of_time = collectives.agree(bool(interrupt), budget.exhausted(), device=device)
            if interrupted or out_of_time:  # between steps: the state is whole
                reason = StopReason.INTERRUPTED if interrupted else StopReason.TIME_BUDGET
                break
            indices, epoch, position = step_blocks(len(train_blocks), t.seed, state.epoch,
                                                   state.position, state.global_batch)
            mine = indices[device.rank * state.per_rank_batch:(device.rank + 1) * state.per_rank_batch]
            try:
                with budget.timing("step"):
                    stats = optimizer_step(state, train_blocks[np.sort(mine)], device, t.max_grad_norm,
                                             train_blocks.counted_targets(indices) / device.world_size)
            except oom.OutOfMemoryAtMicroBatchOne:
                reason = StopReason.OUT_OF_MEMORY  # the position stays before this step
                break
            state.epoch, state.position = epoch, position
            _count_step(state, stats, len(indices) * t.max_length)
            state.schedule.apply(state.optimizer, state.step)
            window.count(stats, len(indices) * t.max_length, clock() - began)
            forecast = budget.forecast(state.step, steps, t.eval_steps, t.save_steps)
            bar.set_postfix({**_progress(state, stats, window, device), **forecast.postfix()}, refresh=False)
            if state.step == min(first_step + CLOCK_AFTER_STEPS, steps) and not fit_at:  # the first steps are timed
                log.info("session clock: %s", forecast.describe())
            if state.step == fit_at:
                plan = _fit(state, ctx, corpus, cap=steps)
                steps = bar.total = state.schedule.total_steps
            bar.update()
            reporter.scalars({"train/loss": stats.loss, "train/grad_norm": stats.grad_norm,
                              "train/learning_rate": state.schedule.lr(state.step)}, state.step)
            if state.step % t.eval_steps == 0 or state.step == steps:
                with budget.timing("eval"):
                    _evaluate_and_record(state, ctx, window)
                    if device.is_main:
                        live.update(state.history)
                if plan and not plan.refitted and planning.drifted(plan, budget, t.eval_steps, t.save_steps):
                    plan = dataclasses.replace(_fit(state, ctx, corpus, cap=plan.cap), refitted=True)
                    steps = bar.total = state.schedule.total_steps
            if state.step % t.save_steps == 0 or state.step == steps:
                collectives.check_in_sync(state.model, state.step, device)
                with budget.timing("save"):
                    _save_checkpoint(state, ctx)
            if state.bad_streak >= t.max_bad_steps:
                reason = StopReason.BAD_LOSS
                break
    last_recorded = state.history[-1].step if state.history else None
    if reason is StopReason.TIME_BUDGET and last_recorded != state.step:  # the history ends where training did
        _evaluate_and_record(state, ctx, window)
    _save_on_stop(reason, state, ctx)
    reporter.close()
    return RunResult(state, reason, run_dir, clock() - ctx.started, interrupt.signal_name, steps,
                     first_step, first_tokens)


@dataclasses.dataclass(frozen=True)
class _Run:
    """What the loop's helpers share for a whole run."""
    cfg: RunConfig
    config: dict  # cfg as JSON, stored in every checkpoint
    device: Device
    val_blocks: np.ndarray  # the fixed validation subset
    tokenizer: object  # for the samples at each evaluation
    chat_format: bool  # the prompts go through the chat template
    reporter: report.Reporter
    started: float
    budget: stopping.TimeBudget
    flops_per_token: float
    peak_flops: float  # of one device, in the run's precision (mfu.peak_flops)


def _count_step(state: TrainState, stats: StepStats, tokens: int) -> None:
    state.step += 1
    state.tokens_seen += tokens
    state.step_losses.append(stats.loss if stats.applied else math.nan)
    state.skipped_steps += not stats.applied
    state.bad_streak = state.bad_streak + 1 if stats.bad_loss else 0
    if stats.bad_loss:
        log.warning("step %d: loss %s, gradient norm %s: update skipped (%d in a row)",
                    state.step, stats.loss, stats.grad_norm, state.bad_streak)


def _save_on_stop(reason: StopReason, state: TrainState, ctx: _Run) -> None:
    """A resumable checkpoint for every stop (RunResult.saved); an emergency one when something
    went wrong. Every rank calls it: the ranks agreed on the stop."""
    if reason in (StopReason.COMPLETED, StopReason.TIME_BUDGET):
        _save_checkpoint(state, ctx)
        return
    rng_states = collectives.gather(capture_rng(), ctx.device)
    if ctx.device.is_main:  # skipped steps changed no weights, so for a bad loss these are the last good ones
        checkpoint.save(ctx.cfg.output_dir / checkpoint.EMERGENCY, state.state_dict(ctx.config, rng_states))


def _progress(state: TrainState, stats: StepStats, window: progress.Window, device: Device) -> dict:
    shown = {"loss": f"{stats.loss:.3f}", "lr": f"{state.schedule.lr(state.step):.2e}",
             "grad_norm": f"{stats.grad_norm:.2f}",
             "tok/s": f"{window.tokens_per_second():,.0f}"}
    if device.is_cuda:
        shown["mem"] = f"{peak_memory(device)['peak_gpu_memory_gb']:.1f}GB"
    return shown


def _evaluate_and_record(state: TrainState, ctx: _Run, window: progress.Window) -> None:
    """Validation loss into the history (one record per evaluation, with samples of the prompts);
    a new best is saved."""
    cfg = ctx.cfg
    state.val_loss = evaluate(state.model, ctx.val_blocks, ctx.device, cfg.train.batch_size)
    state.train_loss = float(np.mean(window.losses)) if window.losses else math.nan
    recorded = sum(len(r.events) for r in state.history)
    tokens_per_second = window.tokens_per_second()
    record = history.Record(
        epoch=state.epoch, step=state.step, tokens_seen=state.tokens_seen, train_loss=state.train_loss,
        val_loss=state.val_loss, learning_rate=state.schedule.lr(state.step),
        grad_norm=float(np.mean(window.grad_norms)) if window.grad_norms else math.nan,
        tokens_per_second=tokens_per_second,
        mfu=mfu.utilisation(tokens_per_second, ctx.flops_per_token, ctx.peak_flops, ctx.device.world_size),
        elapsed_seconds=clock() - ctx.started,
        timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        batch_size=state.batch_size, gradient_accumulation_steps=state.gradient_accumulation_steps,
        skipped_steps=state.skipped_steps, **peak_memory(ctx.device),
        events=state.events[recorded:],  # OOM back-offs and applied changes since the previous record
        samples=(generate.samples(state.model, ctx.tokenizer, cfg.sampling, ctx.chat_format)
                 if ctx.device.is_main else []))
    state.history.append(record)
    length = state.schedule.total_steps
    forecast = ctx.budget.forecast(state.step, length, cfg.train.eval_steps, cfg.train.save_steps)
    log.info("step %d/%d: train loss %.4f, val loss %.4f (perplexity %.1f), lr %.2e, grad norm %.2f, "
             "%.0f tokens/s, MFU %s, %.0f s; %s", state.step, length, state.train_loss,
             state.val_loss, record.val_perplexity, record.learning_rate, record.grad_norm,
             record.tokens_per_second, mfu.shown(record.mfu), record.elapsed_seconds, forecast.describe())
    ctx.reporter.scalars(report.evaluation_scalars(record), state.step)
    if ctx.device.is_main:  # every rank holds the same history and weights; one writes them
        history.write(cfg.output_dir, state.history)
    if state.val_loss < state.best_val_loss and weights_are_finite(state.model):
        state.best_val_loss = state.val_loss
        if ctx.device.is_main:
            checkpoint.save(cfg.output_dir / checkpoint.BEST_MODEL, state.state_dict(ctx.config))
    window.reset()  # throughput counts training, not evaluation and its saves


def _fit(state: TrainState, ctx: _Run, corpus: Corpus, cap: int) -> planning.Plan:
    """Fit the run's length to its budget now: rank 0's plan, on every rank; the schedule spans it."""
    t, budget = ctx.cfg.train, ctx.budget
    eval_seconds = budget.eval_seconds or planning.estimated_eval_seconds(budget.step_seconds, t.eval_blocks,
                                                                          state.global_batch)
    items = ctx.cfg.hellaswag_items or (hellaswag.VALIDATION_ITEMS if ctx.cfg.eval_hellaswag else 0)
    after = planning.after_training_seconds(eval_seconds, budget.save_seconds, len(ctx.val_blocks),
                                            len(corpus.blocks("test")), items)
    plan = planning.fit(budget, state.step, cap, t.eval_steps, t.save_steps, after, eval_seconds)
    total = int(collectives.from_rank_0(plan.total_steps, ctx.device))
    plan = dataclasses.replace(plan, total_steps=total)
    state.planned_steps = state.schedule.total_steps = total
    state.schedule.apply(state.optimizer, state.step)
    state.events.append(plan.as_event())
    log.info("%s", plan.describe())
    return plan


def _save_checkpoint(state: TrainState, ctx: _Run) -> None:
    """Checkpoint this step (once, from rank 0, with every rank's RNG state: all of them call
    it at the same step), rotate, and drop the emergency checkpoint it supersedes."""
    rng_states = collectives.gather(capture_rng(), ctx.device)
    if not ctx.device.is_main:
        return
    cfg, config = ctx.cfg, ctx.config
    path = checkpoint.checkpoint_path(cfg.output_dir, state.epoch, state.step)
    if path.exists():
        return
    checkpoint.save(path, state.state_dict(config, rng_states))
    checkpoint.rotate(path.parent, cfg.train.max_checkpoints)
    (cfg.output_dir / checkpoint.EMERGENCY).unlink(missing_ok=True)
