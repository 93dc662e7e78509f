"""The notebook's cells as one run: the stages in order, what a stop means for the cells after
it, and the check that the objects a cell is handed belong to this configuration.

    run = nblib.run.start(globals())   # Setup
    corpus = run.data()                # Data
    model = run.model(corpus)          # Model
    result = run.train(model, corpus)  # Train
    run.evaluate(model, corpus)        # Evaluate (the test split)
    run.curves()                       # Training curves
    final_dir = run.export(model, corpus)
    run.hellaswag(model, corpus)
    run.generate(model, corpus)
    run.publish(final_dir)
    run.summary()

`python -m nblib.job` calls the same methods, so a script does what Run All does.

A normal stop (`dry_run`, the interrupt button, SIGTERM) is not an error. The cell that stopped
prints one plain line; each later cell prints one line saying it did nothing and why; the summary
cell, the last, says where the run stopped. So Run All ends quietly, papermill exits 0, and
whoever scrolls to the bottom finds the reason. Running a cell again, from the one that stopped or
an earlier one, clears the stop. A refusal (console.Refusal: a bad parameter, another run's
checkpoint, a busy folder, a bad data file) is shown in its cell as its message, in a few lines,
and stops the run the same way; the summary cell raises it again, so Run All ends on the reason,
at the bottom where Jupyter leaves the view, and papermill and `python -m nblib.job` fail.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import sys
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from nblib import console, history
from nblib.data import cache
from nblib.data.cache import Corpus
from nblib.evaluation import hellaswag, validation
from nblib.export import generate, gguf_file, huggingface, publish
from nblib.model import gpt2
from nblib.monitoring import plots
from nblib.setup import hardware, lock, params
from nblib.setup.config import RunConfig
from nblib.setup.hardware import Device
from nblib.training import collectives, contract, launch, planning, state
from nblib.training.result import RunResult, StopReason

log = logging.getLogger(__name__)

STAGES = {"setup": "Setup", "data": "Data", "model": "Model", "train": "Train", "evaluate": "Evaluate",
          "curves": "Training curves", "export": "Export", "hellaswag": "HellaSwag", "generate": "Generate",
          "publish": "Publish"}  # the cells in order, by their headings
ORDER = list(STAGES)
GGUF_BLOCKS = 8  # held-out blocks llama.cpp reads each GGUF type on, at export (with llama-cpp-python)


@dataclasses.dataclass(frozen=True)
class Stop:
    stage: str  # a key of STAGES
    reason: str  # what happened and what to do
    brief: str  # a few words, for the cells skipped after it
    refusal: console.Refusal | None = None  # a refusal: the summary cell raises it again

    def __str__(self) -> str:
        return f"the run stopped in the {STAGES[self.stage]} cell: {self.reason}"


def stage(name: str):
    """A cell's method: after a stop in an earlier cell it does nothing but say so; run again at
    or before the cell that stopped, it clears the stop and does its work. A refusal it meets
    is shown, in its cell, as its message, and becomes the run's stop."""
    def decorate(method):
        @functools.wraps(method)
        def cell(self: Run, *args, **kwargs):
            if self.stopped is not None:
                if ORDER.index(name) > ORDER.index(self.stopped.stage):
                    print(f"skipped: the run stopped in the {STAGES[self.stopped.stage]} cell "
                          f"({self.stopped.brief}); the summary at the bottom says more")
                    return None
                self.stopped = None
            try:
                return method(self, *args, **kwargs)
            except console.Refusal as refusal:
                self._refused(name, refusal)
                return None
        return cell
    return decorate


def start(values: Mapping[str, Any]) -> Run:
    """The setup cell: resolve the parameters (a notebook's `globals()`, a job file's mapping),
    show the configuration and the hardware, seed, claim `output_dir` and say whether the run is
    new or continues one. A refusal here (a bad or misspelt parameter, a GPU preset on a CPU, a
    busy `output_dir`, another run's checkpoint) is shown, and stops the run: the summary cell
    raises it."""
    console.show_logs()
    run = Run()
    run.setup(values)
    return run


class Run:
    """One configuration's run through the notebook's cells, in this process."""

    def __init__(self):
        self.cfg: RunConfig | None = None  # None until the setup cell has resolved the parameters
        self.device: Device | None = None
        self.stopped: Stop | None = None
        self.result: RunResult | None = None

    @stage("setup")
    def setup(self, values: Mapping[str, Any]) -> None:
        cfg = self.cfg = params.resolve(values)
        print(params.describe(cfg))
        device = self.device = (launch.join_torchrun(cfg.train.precision) if launch.under_torchrun()
                                else hardware.detect(cfg.train.precision, cfg.devices))
        print(device.describe(), collectives.describe(device, cfg.train), sep="\n")
        warning = hardware.cpu_check(cfg, device)
        if warning:
            log.warning(warning)
        problem = cfg.train.fit_to_budget and planning.setup_problem(cfg.train.time_budget_minutes, cfg.started_at,
                                                                     time.time())
        if problem:
            raise console.ConfigError(problem)
        state.seed_everything(cfg.train.seed)
        if not cfg.dry_run and device.is_main:
            lock.hold(cfg.output_dir)  # until the summary cell: a second run here stops, naming this one
        print(contract.preview(cfg, device.world_size))
        if cfg.dry_run:
            self.stopped = Stop("setup", "dry_run=True shows the configuration and trains nothing; set "
                                         "dry_run=False and run the setup cell again to train", "dry_run=True")
            print(f"dry run: {self.stopped.reason}")

    def _refused(self, name: str, refusal: console.Refusal) -> None:
        self.stopped = Stop(name, str(refusal).splitlines()[0], f"refused: {type(refusal).__name__}", refusal)
        print(f"{type(refusal).__name__}: {refusal}", file=sys.stderr)

    @stage("data")
    def data(self) -> Corpus:
        corpus = launch.prepare(self.cfg)
        corpus.made_for = self._data_identity()
        print(corpus.describe())
        return corpus

    @stage("model")
    def model(self, corpus: Corpus) -> torch.nn.Module:
        self._check_corpus(corpus, "Model")
        model = gpt2.build(self.cfg.model, corpus.tokenizer)
        model.nblib_made_for = self._model_identity()
        print(gpt2.describe(model))
        return model

    @stage("train")
    def train(self, model: torch.nn.Module, corpus: Corpus) -> RunResult:
        """Train (resuming where the run's checkpoints say); print how it ended. An interrupt
        stops the run here; a NaN streak or an OOM at micro-batch 1 is an error, its emergency
        checkpoint saved."""
        self._check_corpus(corpus, "Train")
        self._check_model(model)
        result = launch.fit(self.cfg, self.device, model, corpus)
        model.nblib_trained_in = str(self.cfg.output_dir)
        self.result = result
        print(result.describe())
        if result.stop_reason is StopReason.INTERRUPTED:
            self.stopped = Stop("train", result.headline(), f"interrupted at step {result.state.step:,}")
        result.raise_if_failed()
        return result

    @stage("evaluate")
    def evaluate(self, model: torch.nn.Module, corpus: Corpus) -> float:
        """The best weights (lowest validation loss) into `model`, then the test split's loss."""
        huggingface.load_best_weights(model, self.cfg.output_dir)
        loss = validation.evaluate_test(model, corpus, self.device, self.cfg)
        print(f"test loss {loss:.4f}, perplexity {history.perplexity(loss):.1f} (the best weights)")
        return loss

    @stage("curves")
    def curves(self) -> None:
        """The history's curves, shown and saved as training_curves.png."""
        records = history.read(self.cfg.output_dir)
        if records:
            plots.curves(records, self.cfg.output_dir)
        else:
            print("no evaluation was recorded: nothing to plot")

    @stage("export")
    def export(self, model: torch.nn.Module, corpus: Corpus):
        held_out = np.asarray(corpus.blocks("validation")[:GGUF_BLOCKS])  # llama.cpp's measure of the GGUF types
        path = huggingface.final_model_of_run(model, corpus.tokenizer, self.cfg, corpus.is_chat, held_out)
        gguf = path / gguf_file.GGUF
        print(f"exported {path}" + (f", with {gguf_file.GGUF} ({self.cfg.gguf_kind}, "
                                    f"{console.size(gguf.stat().st_size)})" if gguf.is_file() else ""))
        return path

    @stage("hellaswag")
    def hellaswag(self, model: torch.nn.Module, corpus: Corpus):
        """With `eval_hellaswag`, the score, into the history and the exported model's card."""
        if not self.cfg.eval_hellaswag:
            return None
        score = hellaswag.evaluate_run(model, corpus.tokenizer, self.device, self.cfg)
        final_dir = self.cfg.output_dir / huggingface.FINAL_MODEL
        if final_dir.is_dir():  # the card, written at the export, gains the score
            publish.write_card(final_dir, self.cfg, chat=corpus.is_chat)
        print(score.describe())
        return score

    @stage("generate")
    def generate(self, model: torch.nn.Module, corpus: Corpus) -> list[str]:
        sampler, tokenizer = generate.model_to_sample(self.cfg.sample_from, model, corpus.tokenizer, self.device)
        texts = generate.samples(sampler, tokenizer, self.cfg.sampling, corpus.is_chat)
        print("\n\n---\n\n".join(texts))
        return texts

    @stage("publish")
    def publish(self, final_dir) -> str | None:
        if not self.cfg.upload_to:
            return None
        notes = self.result.headline() if self.result else ""
        shown = publish.upload(final_dir, self.cfg.upload_to, notes=notes)
        print(shown)
        return shown

    def summary(self) -> None:
        """The last cell, always run: free `output_dir`, list what the run left, and say where it
        stopped, if it did; a refusal is raised again here, so Run All ends on it (and papermill
        and `python -m nblib.job` fail)."""
        if self.cfg is not None:
            lock.release(self.cfg.output_dir)
            if not self.cfg.dry_run and self.cfg.output_dir.is_dir():
                print(huggingface.summary(self.cfg.output_dir))
        if self.stopped is not None and self.stopped.refusal is not None:
            raise self.stopped.refusal
        print(str(self.stopped) if self.stopped else "the run went through every cell")

    def _data_identity(self) -> dict:
        t = self.cfg.train
        return {"data": cache.cache_key(self.cfg), "max_length": t.max_length, "stride": self.cfg.data.stride,
                "drop_remainder": self.cfg.data.drop_remainder}

    def _model_identity(self) -> dict:
        return {"model": dataclasses.asdict(self.cfg.model), "data": cache.cache_key(self.cfg)}

    def _check_corpus(self, corpus: Corpus, cell: str) -> None:
        made_for = getattr(corpus, "made_for", None)
        if made_for is not None and made_for != (now := self._data_identity()):
            raise console.ConfigError(
                f"the corpus was prepared for another configuration ({_differences(made_for, now)}): "
                f"run the Data cell again, then the Model cell and this {cell} cell")

    def _check_model(self, model: torch.nn.Module) -> None:
        made_for = getattr(model, "nblib_made_for", None)
        if made_for is not None and made_for != (now := self._model_identity()):
            raise console.ConfigError(
                f"the model was built for another configuration ({_differences(made_for, now)}): "
                "run the Model cell again, then this Train cell")
        trained_in = getattr(model, "nblib_trained_in", None)
        if trained_in is not None and trained_in != str(self.cfg.output_dir):
            raise console.ConfigError(
                f"the model holds weights trained in {trained_in}, and this run's output_dir is "
                f"{self.cfg.output_dir}: a new run starts from init_from={self.cfg.model.init_from!r}. "
                "Run the Model cell again, then this Train cell")


def _differences(old: dict, new: dict) -> str:
    """'n_embd 64 -> 256, max_length 32 -> 64': what differs between two identities."""
    old, new = _flat(old), _flat(new)
    return ", ".join("the data (dataset, files, tokenizer, columns or seed)" if key == "data"
                     else f"{key} {old.get(key)!r} -> {new[key]!r}" for key in new if old.get(key) != new[key])


def _flat(identity: dict) -> dict:
    flat = {}
    for key, value in identity.items():
        flat.update(value if isinstance(value, dict) else {key: value})
    return flat
