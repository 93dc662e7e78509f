"""Data preparation: tokenize + pack + cache throughput against the raw fast tokenizer, peak memory
on a corpus of 100 MB or more, and the time to the first training step when the cache exists.

    python bench/data_prep.py [--megabytes 100]

Prints one JSON line per measurement, then a short table.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PREPARE = """
import sys, time
from nblib import data
from nblib.setup import params
started = time.perf_counter()
corpus = data.prepare(params.resolve(dict(preset="smoke", dataset=sys.argv[1], tokenizer=sys.argv[2],
                                          output_dir=sys.argv[3], max_length=64)))
print(time.perf_counter() - started, sum(len(t) for t in corpus.tokens.values()))
"""
RAW = """
import sys, time
from transformers import AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(sys.argv[2])
lines = open(sys.argv[1]).read().splitlines()
started = time.perf_counter()
count = 0
for i in range(0, len(lines), 1000):
    count += sum(map(len, tokenizer(lines[i:i + 1000], add_special_tokens=False)["input_ids"]))
print(time.perf_counter() - started, count)
"""
FIRST_STEP = """
import time
started = time.perf_counter()
from nblib.setup import params
from nblib import data
from nblib.setup import hardware
from nblib import model
from nblib.training import optimization
from nblib.training import state
cfg = params.resolve(dict(preset="smoke", output_dir=__import__("sys").argv[1]))
state.seed_everything(0)
corpus = data.prepare(cfg)
device = hardware.detect(cfg.train.precision)
s = optimization.new_state(cfg, device, model.build(cfg.model, corpus.tokenizer), 10)
optimization.optimizer_step(s, corpus.blocks("train")[__import__("numpy").arange(16)], device, 1.0)
print(time.perf_counter() - started)
"""


def child(code: str, *args: str) -> tuple[list[float], float]:
    """Run `code` in a fresh interpreter: the numbers on its last line, and the largest peak RSS
    (MB) of any child so far."""
    out = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout.strip().splitlines()[-1]
    return [float(x) for x in out.split()], resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=100)
    args = parser.parse_args()
    from nblib.data import sources, tokenizer

    work = Path(tempfile.mkdtemp())
    docs = "\n\n".join(sources.python_docs())
    corpus = work / "corpus.train.txt"
    repeats = max(1, args.megabytes * 2**20 // len(docs.encode()) + 1)
    corpus.write_text("\n\n".join([docs] * repeats))
    size_mb = corpus.stat().st_size / 2**20
    tokenizer.train_bpe([docs], 8192).save_pretrained(str(work / "tokenizer"))

    # nblib first: RUSAGE_CHILDREN keeps the largest peak so far, and the raw run holds all lines
    (prep_s, prep_tokens), peak_mb = child(PREPARE, str(corpus), str(work / "tokenizer"), str(work / "run"))
    (raw_s, raw_tokens), _ = child(RAW, str(corpus), str(work / "tokenizer"))
    child(FIRST_STEP, str(work / "first"))  # cold: builds the smoke cache
    (first_step_s,), _ = child(FIRST_STEP, str(work / "first"))  # warm
    rows = [
        dict(bench="data_prep", what="raw fast tokenizer batch encode", megabytes=round(size_mb, 1),
             seconds=round(raw_s, 2), tokens=int(raw_tokens), tokens_per_second=round(raw_tokens / raw_s)),
        dict(bench="data_prep", what="nblib tokenize + pack + cache", megabytes=round(size_mb, 1),
             seconds=round(prep_s, 2), tokens=int(prep_tokens), tokens_per_second=round(prep_tokens / prep_s),
             ratio_to_raw=round((prep_tokens / prep_s) / (raw_tokens / raw_s), 3), peak_rss_mb=round(peak_mb)),
        dict(bench="data_prep", what="smoke: process start to first step, warm cache",
             seconds=round(first_step_s, 2)),
    ]
    for row in rows:
        print(json.dumps(row))
    print()
    for row in rows:
        print(f"{row['what']:48} {row['seconds']:>8.2f} s  {row.get('tokens_per_second', ''):>10}")


if __name__ == "__main__":
    main()
