"""One side of the export-portability test, run by another environment's python (another major
transformers): `load DIR` prints what that version reads from an export, as JSON; `export SRC DST`
re-exports SRC with nblib under that version."""
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Tokenizer, pipeline

TEXT = "the old king wrote a song of stone.\n<|endoftext|> people came  to see the bridge"


def read(directory: str) -> dict:
    """What transformers at this version makes of an export: three tokenizer paths and the logits."""
    fast, slow = AutoTokenizer.from_pretrained(directory), GPT2Tokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory)
    ids = fast(TEXT)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids[:12]])).logits[0, -1]
    generated = pipeline("text-generation", model=directory)("the river", max_new_tokens=4, do_sample=False)
    return {"fast": ids, "slow": slow(TEXT)["input_ids"], "logits": logits.tolist(),
            "model_max_length": fast.model_max_length, "generated": generated[0]["generated_text"]}


if __name__ == "__main__":
    if sys.argv[1] == "load":
        print(json.dumps(read(sys.argv[2])))
    else:
        from nblib.export import huggingface

        source = sys.argv[2]
        huggingface.final_model(AutoModelForCausalLM.from_pretrained(source), AutoTokenizer.from_pretrained(source),
                           Path(sys.argv[3]))
