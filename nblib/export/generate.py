"""Text samples from a trained model, in the notebook or from the command line.

    python -m nblib.export.generate --model runs/smoke/final_model --prompt "Return the" \
        --temperature 0.7 --top-k 40 --num-return-sequences 3 --seed 1
"""
from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedModel, PreTrainedTokenizerFast

from nblib.data import chat
from nblib.model import gpt2
from nblib.setup.config import ModelConfig, SamplingConfig
from nblib.setup.hardware import Device
from nblib.training import checkpoint


@torch.no_grad()
def samples(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, sampling: SamplingConfig,
            chat_format: bool = False) -> list[str]:
    """`num_return_sequences` sampled continuations of each prompt, prompt first; with
    `chat_format`, each prompt is the user's turn in the tokenizer's chat template, and the
    text is the whole exchange.

    The same seed gives the same texts, and training's random state is left as it was."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    context = model.config.n_positions
    padding = list(range(len(tokenizer), model.config.vocab_size))  # a training model's padded rows
    settings = generation_config(sampling, tokenizer, model.config)
    texts = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(sampling.seed)
        for prompt in sampling.prompts:
            text = chat.prompt_text(tokenizer, prompt) if chat_format else prompt
            inputs = tokenizer(text, return_tensors="pt", return_token_type_ids=False).to(device)
            prompt_length = inputs["input_ids"].shape[1]
            if prompt_length >= context:
                raise ValueError(f"prompt {prompt[:40]!r}... is {prompt_length} tokens; the model "
                                 f"sees at most n_positions={context}")
            # Past n_positions the position embedding has no row: stop at the context's end.
            # (Arguments beside a generation_config are deprecated in transformers 5: one config.)
            call = copy.deepcopy(settings)
            call.update(num_return_sequences=sampling.num_return_sequences, suppress_tokens=padding or None,
                        max_new_tokens=min(sampling.max_new_tokens, context - prompt_length))
            output = model.generate(**inputs, generation_config=call)
            texts += tokenizer.batch_decode(output, skip_special_tokens=True)
    model.train(was_training)
    return texts


def generation_config(sampling: SamplingConfig, tokenizer: PreTrainedTokenizerFast, config) -> GenerationConfig:
    """`sampling` as transformers' GenerationConfig: what samples() uses and final_model keeps."""
    return GenerationConfig(
        do_sample=True, temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
        repetition_penalty=sampling.repetition_penalty, max_new_tokens=sampling.max_new_tokens,
        bos_token_id=config.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id)


def load(path: Path,
         tokenizer: PreTrainedTokenizerFast | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A model and tokenizer from a Hugging Face directory such as `final_model/` (a LoRA adapter
    directory needs peft), or from a checkpoint `.pt` with the run's `tokenizer`."""
    path = Path(path)
    if path.suffix == ".pt":
        if tokenizer is None:
            raise ValueError(f"{path} is a checkpoint: give the tokenizer it was trained with")
        saved = checkpoint.load(path)
        shape = dict(saved["config"]["model"])
        shape["lora_target_modules"] = tuple(shape.get("lora_target_modules", ()))
        model = gpt2.build(ModelConfig(**shape), tokenizer)
        gpt2.load_weights(model, saved)
        return model, tokenizer
    if (path / "adapter_config.json").is_file():
        from peft import AutoPeftModelForCausalLM

        return AutoPeftModelForCausalLM.from_pretrained(str(path)), AutoTokenizer.from_pretrained(str(path))
    return AutoModelForCausalLM.from_pretrained(str(path)), tokenizer or AutoTokenizer.from_pretrained(str(path))


def model_to_sample(sample_from: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast,
                    device: Device) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """The notebook's generate cell: `model` when `sample_from` is "", else what `load` gives,
    on `device.device` (the GPU where there is one)."""
    if not sample_from:
        return model, tokenizer
    loaded, loaded_tokenizer = load(Path(sample_from), tokenizer)
    return loaded.to(device.device), loaded_tokenizer


def main(argv: list[str] | None = None) -> None:
    defaults = SamplingConfig(prompts=())
    parser = argparse.ArgumentParser(description="Generate text with a trained model")
    parser.add_argument("--model", required=True, type=Path, help="a final_model directory, or a checkpoint .pt")
    parser.add_argument("--tokenizer", type=Path, help="the tokenizer directory, for a checkpoint .pt")
    parser.add_argument("--prompt", action="append", required=True, help="repeat for several")
    parser.add_argument("--chat", action="store_true", help="each prompt is a user's turn in the "
                        "model's chat template (a model fine-tuned on conversations)")
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--temperature", type=float, default=defaults.temperature)
    parser.add_argument("--top-k", type=int, default=defaults.top_k)
    parser.add_argument("--top-p", type=float, default=defaults.top_p)
    parser.add_argument("--repetition-penalty", type=float, default=defaults.repetition_penalty)
    parser.add_argument("--num-return-sequences", type=int, default=defaults.num_return_sequences)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    args = parser.parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(str(args.tokenizer)) if args.tokenizer else None
    model, tokenizer = load(args.model, tokenizer)
    sampling = SamplingConfig(
        prompts=tuple(args.prompt), max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
        num_return_sequences=args.num_return_sequences, seed=args.seed)
    for text in samples(model, tokenizer, sampling, chat_format=args.chat):
        print(text, end="\n\n")


if __name__ == "__main__":
    main()
