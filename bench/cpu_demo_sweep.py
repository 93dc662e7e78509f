"""cpu-demo's hyper-parameters by measurement: block length, batch, dropout and learning rate on
the built-in corpus, each trial a fresh `python -m nblib.job` on the same number of tokens.

    python bench/cpu_demo_sweep.py [--tokens 750000] [--trials preset,T256,...]

A trial is cpu-demo with a few values changed; its steps are `--tokens` over the tokens per step,
its warm-up 1/15 of them, with one evaluation at the end. Prints one JSON line per trial
(validation perplexity at the trial's own block length, training seconds, tokens/s), then a
table. The perplexity of a longer block is lower for the same model (more context per token), so
compare T=128 and T=256 rows by their loss at equal time, as the table shows both.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nblib.setup.params import resolve  # noqa: E402

TRIALS = {
    "preset": {},
    "T256": dict(max_length=256),
    "nodrop": dict(dropout=0.0),
    "nodrop-lr2e-3": dict(dropout=0.0, learning_rate=2e-3),
    "nodrop-lr3e-3": dict(dropout=0.0, learning_rate=3e-3),
    "nodrop-lr2e-3-b8": dict(dropout=0.0, learning_rate=2e-3, gradient_accumulation_steps=1),
    "lr2e-3": dict(learning_rate=2e-3),
    "nodrop-lr2e-3-T256-b8": dict(dropout=0.0, learning_rate=2e-3, max_length=256, gradient_accumulation_steps=1),
}


def trial(name: str, tokens: int, work: Path) -> dict:
    values = {"preset": "cpu-demo", "output_dir": str(work / name), "resume_from_checkpoint": "",
              "save_steps": 10**6, **TRIALS[name]}
    cfg = resolve(values)
    steps = max(1, tokens // cfg.train.tokens_per_step)
    values.update(max_steps=steps, warmup_steps=max(1, steps // 15), eval_steps=steps)
    (work / f"{name}.json").write_text(json.dumps(values))
    subprocess.run([sys.executable, "-m", "nblib.job", str(work / f"{name}.json")], check=True,
                   capture_output=True, cwd=Path(__file__).resolve().parent.parent)
    last = json.loads((work / name / "training_history.json").read_text())[-1]
    return dict(bench="cpu_demo_sweep", trial=name, changes=TRIALS[name], steps=steps,
                tokens=last["tokens_seen"], val_loss=round(last["val_loss"], 4),
                val_perplexity=round(last["val_perplexity"], 2), seconds=round(last["elapsed_seconds"], 1),
                tokens_per_second=round(last["tokens_per_second"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=750_000)
    parser.add_argument("--trials", default=",".join(TRIALS), help=f"some of {', '.join(TRIALS)}")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    rows = []
    for name in args.trials.split(","):
        rows.append(trial(name, args.tokens, work))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'trial':22} {'steps':>6} {'seconds':>8} {'tokens/s':>9} {'val loss':>9} {'perplexity':>10}")
    for r in rows:
        print(f"{r['trial']:22} {r['steps']:>6} {r['seconds']:>8} {r['tokens_per_second']:>9,} "
              f"{r['val_loss']:>9} {r['val_perplexity']:>10}")


if __name__ == "__main__":
    main()
