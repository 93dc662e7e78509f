"""Conversations: the chat template, and a conversation as token ids with a loss mask.

A conversation is a list of `{"role": "system" | "user" | "assistant", "content": str}`. It is
rendered with the tokenizer's chat template (GPT-2 has none: `TEMPLATE` below is given to it and
saved with it, so `final_model` formats prompts the same way), then tokenized once. A token
carries loss when `train_on="all"`, or, with `train_on="responses"`, when it begins inside an
assistant message's span of the rendered text. The first token of every conversation carries
none: packed after the previous conversation, it would be a prediction across the two.
"""
from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerFast

from nblib.console import DataError

ROLES = ("system", "user", "assistant")
# Plain words, so that any byte-level tokenizer takes it without new tokens. An assistant turn
# ends with the end-of-text token: a model trained on it stops there when generating.
TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}User: {{ message['content'] }}\n"
    "{% else %}Assistant: {{ message['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}")


def ensure_template(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """The tokenizer with a chat template: its own if it has one, else `TEMPLATE`."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = TEMPLATE
    return tokenizer


def render(tokenizer: PreTrainedTokenizerFast, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def prompt_text(tokenizer: PreTrainedTokenizerFast, prompt: str) -> str:
    """A generation prompt as the user's turn, ready for the assistant's answer."""
    return render(tokenizer, [{"role": "user", "content": prompt}], generation_prompt=True)


def from_columns(instructions: list[str], responses: list[str]) -> list[list[dict]]:
    """Instruction/response rows as one-turn conversations."""
    return [[{"role": "user", "content": i}, {"role": "assistant", "content": r}]
            for i, r in zip(instructions, responses)]


def tokenize(batch: dict, indices: list[int], tokenizer: PreTrainedTokenizerFast, train_on: str,
             where: str) -> dict:
    """`datasets.map` function: each row's `messages` -> `input_ids` and `loss_mask` (1: a target
    that carries loss)."""
    ids, masks = [], []
    for messages, index in zip(batch["messages"], indices):
        tokens, mask = encode(tokenizer, checked(messages, f"{where}, row {index}"), train_on)
        ids.append(tokens)
        masks.append(mask)
    return {"input_ids": ids, "loss_mask": masks}


def encode(tokenizer: PreTrainedTokenizerFast, messages: list[dict], train_on: str) -> tuple[list[int], list[int]]:
    text = render(tokenizer, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if train_on == "all":
        mask = [1] * len(encoded["input_ids"])
    else:
        spans = assistant_spans(tokenizer, messages, text)
        mask = [int(any(a <= start < b for a, b in spans)) for start, _ in encoded["offset_mapping"]]
    if mask:
        mask[0] = 0
    return encoded["input_ids"], mask


def assistant_spans(tokenizer: PreTrainedTokenizerFast, messages: list[dict], text: str) -> list[tuple[int, int]]:
    """Character spans of `text` that the assistant wrote: from the end of the generation prompt
    before each assistant message to the end of that message as rendered.

    Raises:
        ValueError: the template renders a conversation's beginning differently from the whole
            (its spans cannot be found), naming the fix.
    """
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], generation_prompt=True)
        through = render(tokenizer, messages[:i + 1])
        if not (text.startswith(through) and through.startswith(before)):
            raise DataError("train_on='responses': the tokenizer's chat template does not render a "
                             "conversation's beginning as the start of the whole, so the assistant's "
                             "tokens cannot be told apart; use train_on='all'")
        spans.append((len(before), len(through)))
    return spans


def checked(messages: Any, where: str) -> list[dict]:
    """`messages` when it is a conversation.

    Raises:
        ValueError: naming the row and what is wrong with it.
    """
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}}, "
                         f"not {str(messages)[:60]}")
    for turn in messages:
        if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
            raise DataError(f"{where}: each message needs a role ({', '.join(ROLES)}) and a text "
                             f"content, not {str(turn)[:80]}")
    if not any(turn["role"] == "assistant" for turn in messages):
        raise DataError(f"{where}: the conversation has no assistant message to learn from")
    return [{"role": turn["role"], "content": turn["content"]} for turn in messages]
