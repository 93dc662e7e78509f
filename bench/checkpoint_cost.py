"""Checkpoint cost: save time and its share of wall time at the default save_steps, and resume time,
for the kaggle-t4 model (weights + AdamW state).

    python bench/checkpoint_cost.py

The step time is measured here for one micro-batch and scaled to the preset's accumulation.
Prints one JSON line, then a short summary.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nblib import model  # noqa: E402
from nblib.setup import (
    hardware,  # noqa: E402
    parameters,  # noqa: E402
    params,  # noqa: E402
)
from nblib.training import (
    checkpoint,  # noqa: E402
    optimization,  # noqa: E402
)


class SizedTokenizer:
    """All model.build needs of a tokenizer: its size and end-of-text id."""

    def __init__(self, vocab: int):
        self.vocab, self.eos_token_id, self.bos_token_id = vocab, vocab - 1, vocab - 1

    def __len__(self) -> int:
        return self.vocab


def main() -> None:
    cfg = params.resolve({"preset": "kaggle-t4", "output_dir": tempfile.mkdtemp(), "gradient_accumulation_steps": 1})
    device = hardware.detect(cfg.train.precision)
    net = model.build(cfg.model, SizedTokenizer(cfg.model.vocab_size))
    state = optimization.new_state(cfg, device, net, 100)
    blocks = np.random.default_rng(0).integers(0, 50256, size=(cfg.train.batch_size, cfg.train.max_length + 1))
    optimization.optimizer_step(state, blocks, device, 1.0)  # AdamW's moments now exist
    started = time.perf_counter()
    optimization.optimizer_step(state, blocks, device, 1.0)
    micro_seconds = time.perf_counter() - started
    step_seconds = micro_seconds * parameters.PRESET_VALUES["kaggle-t4"]["gradient_accumulation_steps"]

    path = Path(cfg.output_dir) / "checkpoint.pt"
    save_seconds = checkpoint.save(path, state.state_dict(cfg.to_dict()))
    started = time.perf_counter()
    state.load_state_dict(checkpoint.load(path))
    resume_seconds = time.perf_counter() - started
    save_steps = parameters.PRESET_VALUES["kaggle-t4"]["save_steps"]
    share = save_seconds / (save_steps * step_seconds + save_seconds)
    row = dict(bench="checkpoint_cost", model="kaggle-t4", precision=device.precision,
               checkpoint_mb=round(path.stat().st_size / 2**20, 1), save_seconds=round(save_seconds, 2),
               resume_seconds=round(resume_seconds, 2), step_seconds=round(step_seconds, 2),
               save_steps=save_steps, share_of_wall_time=round(share, 6))
    print(json.dumps(row))
    print(f"\n{row['checkpoint_mb']} MB checkpoint: save {save_seconds:.2f} s, resume {resume_seconds:.2f} s; "
          f"one optimizer step {step_seconds:.1f} s here, so saving every {save_steps} steps costs "
          f"{share:.4%} of wall time. A step {step_seconds / 100:.2f} s long (a GPU 100x faster) would make it "
          f"{save_seconds / (save_steps * step_seconds / 100 + save_seconds):.2%}.")


if __name__ == "__main__":
    main()
