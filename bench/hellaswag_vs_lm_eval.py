"""nblib's HellaSwag scorer against EleutherAI's lm-eval on the same items and model, item by item.

    pip install lm-eval==0.4.13 accelerate   # in an environment with nblib (the hf backend needs accelerate)
    python bench/hellaswag_vs_lm_eval.py --model runs/cpu-demo/final_model [--items hellaswag_val.jsonl] [--limit 500]

Without `--items`, HellaSwag-format items are made from this Python's standard-library docstrings
(the context is a sentence's first 60% of words, the endings its true rest and the rests of three
other sentences), for when HellaSwag itself cannot be downloaded. lm-eval reads the same JSONL
through a task of its own format (`output_type: multiple_choice`, the query the item's `ctx`, the
choices its `endings`, the target delimiter one space), so both score `ctx + " " + ending`.
lm-eval's `acc` picks the highest summed log-likelihood: nblib's `sum_accuracy`. Its `acc_norm`
divides by the ending's length in bytes, nblib's `accuracy` by its tokens: they differ by design.
Prints one JSON line.
"""
from __future__ import annotations

import argparse
import ast
import json
import random
import sys
import sysconfig
import tempfile
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nblib.evaluation import hellaswag  # noqa: E402
from nblib.setup import hardware  # noqa: E402

TASK = """task: nblib_hellaswag_local
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {items}
validation_split: validation
output_type: multiple_choice
doc_to_text: "{{{{ctx}}}}"
doc_to_target: "{{{{label}}}}"
doc_to_choice: "{{{{endings}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def docstring_items(n: int, seed: int = 0) -> list[dict]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sentences = []
    for path in sorted(stdlib.glob("*.py")):
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and ast.get_docstring(node):
                words = ast.get_docstring(node).split(".")[0].split()
                if 12 <= len(words) <= 40:
                    sentences.append(words)
    rng = random.Random(seed)
    rng.shuffle(sentences)
    items = []
    for i, words in enumerate(sentences[:n]):
        cut = int(len(words) * 0.6)
        others = [sentences[(i + k * 97) % len(sentences)] for k in (1, 2, 3)]
        endings = [" ".join(words[cut:]) + "."] + [" ".join(o[int(len(o) * 0.6):]) + "." for o in others]
        label = rng.randrange(4)
        endings[0], endings[label] = endings[label], endings[0]
        items.append({"ctx": " ".join(words[:cut]), "endings": endings, "label": label})
    return items


def lm_eval_picks(model_dir: Path, items_file: Path, n: int) -> tuple[list[int], dict]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory() as tasks:
        (Path(tasks) / "task.yaml").write_text(TASK.format(items=items_file))
        out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model_dir},dtype=float32",
                                      tasks=["nblib_hellaswag_local"], device="cpu", batch_size=16,
                                      task_manager=TaskManager(include_path=tasks), log_samples=True)
    samples = sorted(out["samples"]["nblib_hellaswag_local"], key=lambda s: s["doc_id"])
    chosen = [max(range(len(s["filtered_resps"])), key=lambda k: s["filtered_resps"][k][0]) for s in samples]
    return chosen[:n], out["results"]["nblib_hellaswag_local"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a final_model directory")
    parser.add_argument("--items", type=Path, help="HellaSwag JSONL (default: items made from docstrings)")
    parser.add_argument("--limit", type=int, default=500)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    items_file = args.items.resolve() if args.items else work / "items.jsonl"
    if not args.items:
        items_file.write_text("".join(json.dumps(i) + "\n" for i in docstring_items(args.limit)))
    items = hellaswag.load_items(str(items_file), args.limit)
    if args.items:
        items_file = work / "items.jsonl"  # the same first `limit` items for lm-eval
        items_file.write_text("".join(json.dumps({"ctx": i.context, "endings": list(i.endings), "label": i.label})
                                      + "\n" for i in items))
    model = AutoModelForCausalLM.from_pretrained(str(args.model)).float()
    ours = hellaswag.picks(model, AutoTokenizer.from_pretrained(str(args.model)), items, hardware.detect("fp32", 1))
    theirs, metrics = lm_eval_picks(args.model.resolve(), items_file, len(items))
    labels = [i.label for i in items]
    print(json.dumps({
        "items": len(items), "source": str(args.items or "stdlib docstrings"), "model": str(args.model),
        "nblib_sum_accuracy": sum(s == y for (_, s), y in zip(ours, labels)) / len(items),
        "lm_eval_acc": metrics["acc,none"],
        "same_pick_summed": sum(s == t for (_, s), t in zip(ours, theirs)),
        "nblib_accuracy_mean_loss": sum(m == y for (m, _), y in zip(ours, labels)) / len(items),
        "lm_eval_acc_norm": metrics["acc_norm,none"]}))


if __name__ == "__main__":
    main()
