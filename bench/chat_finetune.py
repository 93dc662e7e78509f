"""A chat fine-tune through the notebook, offline: the loss on held-out answers before and after.

    python bench/chat_finetune.py --base runs/cpu-demo/final_model [--steps 300] [--work runs/chat-bench]

The conversations are made from this Python's standard library: "What does `json.dumps` do?"
answered by the first sentence of its docstring. The base is any GPT-2 `final_model/` (the README
uses cpu-demo's, which has read those docstrings in pretraining, so "before" is already far from
random). The notebook fine-tunes it with `train_on="responses"`; 5% of the conversations are held
out by the data step, and the validation loss is the mean loss per answer token on them. Prints
one JSON line: the loss before (the base model on the same blocks) and after, and the fine-tuned
model's greedy answers to three questions (whichever split their conversations fell in).
"""
from __future__ import annotations

import argparse
import ast
import json
import re
import sys
import sysconfig
from pathlib import Path

import papermill
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nblib import data  # noqa: E402
from nblib.data import chat  # noqa: E402
from nblib.evaluation import validation  # noqa: E402
from nblib.setup import (
    hardware,  # noqa: E402
    params,  # noqa: E402
)

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "text_generation_kaggle_production.ipynb"
SENTENCE = re.compile(r"^(.+?\.)(\s|$)", re.S)


def conversations(limit: int) -> list[dict]:
    """Questions on public stdlib functions and methods, answered by their docstring's first sentence."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    rows = []
    for path in sorted(stdlib.glob("*.py")) + sorted(stdlib.glob("*/*.py")):
        if "test" in path.parts[-2:] or path.name.startswith("_") and path.name != "__init__.py":
            continue
        module = ".".join(path.relative_to(stdlib).with_suffix("").parts).removesuffix(".__init__")
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):
            continue
        for name, node in _functions(tree.body, module):
            first = SENTENCE.match(" ".join((ast.get_docstring(node) or "").split()))
            if first:
                rows.append({"messages": [{"role": "user", "content": f"What does `{name}` do?"},
                                          {"role": "assistant", "content": first.group(1)}]})
    return rows[:limit]


def _functions(body: list, prefix: str):
    """(qualified name, node) of the public functions, and of the public classes' methods."""
    for node in body:
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
            yield f"{prefix}.{node.name}", node
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            yield from _functions(node.body, f"{prefix}.{node.name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True, help="a final_model directory to fine-tune")
    parser.add_argument("--work", type=Path, default=Path("runs/chat-bench"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--conversations", type=int, default=20000)
    args = parser.parse_args()
    args.work = args.work.resolve()  # the notebook runs in notebooks/
    args.work.mkdir(parents=True, exist_ok=True)
    dataset = args.work / "stdlib_qa.jsonl"
    rows = conversations(args.conversations)
    dataset.write_text("".join(json.dumps(r) + "\n" for r in rows))
    values = dict(preset="cpu-demo", output_dir=str(args.work / "run"), init_from=str(args.base.resolve()),
                  dataset=str(dataset), train_on="responses", max_length=128, max_steps=args.steps,
                  warmup_steps=20, learning_rate=5e-4, eval_steps=max(1, args.steps // 3),
                  save_steps=args.steps, resume_from_checkpoint="", prompts=[], eval_blocks=400)
    cfg = params.resolve(values)
    corpus = data.prepare(cfg)
    device = hardware.detect(cfg.train.precision, 1)
    held_out = corpus.blocks("validation")[:cfg.train.eval_blocks]
    before = validation.evaluate(AutoModelForCausalLM.from_pretrained(str(args.base)), held_out, device, 8)
    papermill.execute_notebook(str(NOTEBOOK), str(args.work / "out.ipynb"), parameters=values,
                               cwd=str(NOTEBOOK.parent), progress_bar=False)
    history = json.loads((args.work / "run" / "training_history.json").read_text())
    tuned = AutoModelForCausalLM.from_pretrained(str(args.work / "run" / "final_model"))
    tokenizer = corpus.tokenizer
    answers = {}
    for question in ("What does `json.dumps` do?", "What does `shutil.copy` do?", "What does `os.getcwd` do?"):
        ids = tokenizer(chat.prompt_text(tokenizer, question), return_tensors="pt")["input_ids"]
        out = tuned.generate(ids, do_sample=False, max_new_tokens=40, pad_token_id=tokenizer.eos_token_id)
        answers[question] = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=False)
    print(json.dumps({"conversations": len(rows), "steps": args.steps, "device": device.describe(),
                      "held_out_answer_tokens": int(sum((b[1, 1:] != -100).sum() for b in held_out)),
                      "answer_loss_before": round(before, 4),
                      "answer_loss_after": [round(r["val_loss"], 4) for r in history],
                      "answers": answers}, indent=1))


if __name__ == "__main__":
    main()
