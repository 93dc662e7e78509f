"""Text samples from a trained model, in the notebook or from the command line."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerFast


@torch.no_grad()
def samples(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, prompts: list[str],
            max_new_tokens: int = 60, seed: int = 0) -> list[str]:
    """One sampled continuation per prompt (the model's generation config sets the sampling)."""
    model.eval()
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    context = model.config.n_positions
    padding = list(range(len(tokenizer), model.config.vocab_size))  # a training model's padded rows
    texts = []
    for prompt in prompts:
        inputs = tokenizer(prompt, return_tensors="pt").to(device)
        prompt_length = inputs["input_ids"].shape[1]
        if prompt_length >= context:
            raise ValueError(f"prompt {prompt[:40]!r}... is {prompt_length} tokens; the model "
                             f"sees at most n_positions={context}")
        # Past n_positions the position embedding has no row: stop at the context's end.
        output = model.generate(**inputs, max_new_tokens=min(max_new_tokens, context - prompt_length),
                                do_sample=True, pad_token_id=tokenizer.eos_token_id,
                                suppress_tokens=padding or None)
        texts.append(tokenizer.decode(output[0], skip_special_tokens=True))
    return texts


def load(model_dir: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A model and tokenizer from a Hugging Face directory such as `final_model/`."""
    return AutoModelForCausalLM.from_pretrained(str(model_dir)), AutoTokenizer.from_pretrained(str(model_dir))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate text with a trained final_model/")
    parser.add_argument("--model", required=True, type=Path, help="a final_model directory")
    parser.add_argument("--prompt", action="append", required=True, help="repeat for several")
    parser.add_argument("--max-new-tokens", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    model, tokenizer = load(args.model)
    for text in samples(model, tokenizer, args.prompt, args.max_new_tokens, args.seed):
        print(text, end="\n\n")


if __name__ == "__main__":
    main()
