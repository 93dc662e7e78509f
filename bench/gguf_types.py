"""Each GGUF type of a run's final model, as llama.cpp reads it: perplexity on held-out blocks,
file size and greedy tokens/s on this CPU (llama-cpp-python; the export's own `gguf_file.compare`).

    python bench/gguf_types.py --run runs/cpu-demo [--preset cpu-demo] [--blocks 64]

The blocks are the validation split of the preset's data, from the run's data cache: the text
the export measures on (it reads 8 blocks). Prints one JSON line per type, the
transformers model's own perplexity on the same blocks, and a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from transformers import GPT2LMHeadModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nblib import console, data, history  # noqa: E402
from nblib.evaluation import validation  # noqa: E402
from nblib.export import gguf_file  # noqa: E402
from nblib.setup import hardware, params  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a run folder with final_model/ and run_config.json")
    parser.add_argument("--preset", default="cpu-demo")
    parser.add_argument("--blocks", type=int, default=64)
    parser.add_argument("--types", default="float32,float16,q8_0,q4_0")
    args = parser.parse_args()
    cfg = params.resolve({"preset": args.preset, "output_dir": str(args.run)})
    blocks = np.asarray(data.prepare(cfg).blocks("validation")[:args.blocks])
    rows = gguf_file.compare(args.run / "final_model", blocks, tuple(args.types.split(",")))
    device = hardware.detect("fp32", 1)
    reference = validation.evaluate(GPT2LMHeadModel.from_pretrained(str(args.run / "final_model")).to(device.device),
                                    blocks, device, 8)
    print(f"transformers, float32, on the same blocks: perplexity {history.perplexity(reference):.3f}")
    for row in rows:
        print(json.dumps(row))
    print("\n| GGUF type | file | perplexity | tokens/s |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['type']} | {console.size(r['bytes'])} | {r['perplexity']:.3f} | {r['tokens_per_second']:,.0f} |")


if __name__ == "__main__":
    main()
