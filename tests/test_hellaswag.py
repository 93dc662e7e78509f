"""The HellaSwag scorer picks the ending a model was trained to prefer, from HellaSwag's own JSONL."""
import functools
import json

import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from nblib.evaluation import hellaswag
from nblib.setup import hardware

CONTEXTS = ["The river city was", "An old king of the north", "In the morning the boats", "The stone bridge"]
ENDINGS = [["built by the king .", "under the water today .", "a green song of birds .", "sold in the market ."]] * 4
CPU = hardware.Device(torch.device("cpu"), "fp32")


def write_items(path, labels):
    with path.open("w") as out:
        for context, endings, label in zip(CONTEXTS, ENDINGS, labels):
            out.write(json.dumps({"ind": 1, "activity_label": "Rivers", "ctx_a": context, "ctx_b": "",
                                  "ctx": context, "endings": endings, "label": label, "split": "val"}) + "\n")
    return path


@functools.cache
def load_tokenizer(directory):
    return AutoTokenizer.from_pretrained(str(directory))


@functools.cache
def trained_to_prefer(tokenizer, labels: tuple) -> GPT2LMHeadModel:
    """A tiny GPT-2 that has seen each context followed by the ending `labels` picks, many times."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    texts = [f"{c} {e[label]}" for c, e, label in zip(CONTEXTS, ENDINGS, labels)]
    ids = [torch.tensor(tokenizer.encode(t)) for t in texts]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        for row in ids:
            model(input_ids=row[None], labels=row[None]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


@pytest.mark.parametrize("labels", [[0, 1, 2, 3], [3, 2, 0, 1]])
def test_the_scorer_picks_the_endings_the_model_was_trained_on(tmp_path, tokenizer_dir, labels):
    tokenizer = load_tokenizer(tokenizer_dir)
    items = hellaswag.load_items(str(write_items(tmp_path / "val.jsonl", labels)))
    assert [i.label for i in items] == labels and items[0].endings == tuple(ENDINGS[0])
    result = hellaswag.score(trained_to_prefer(tokenizer, tuple(labels)), tokenizer, items, CPU, "val.jsonl")
    assert result.accuracy == 1.0 and result.sum_accuracy == 1.0 and result.items == 4
    other = [(label + 1) % 4 for label in labels]  # the same model, scored against other answers
    wrong = hellaswag.score(trained_to_prefer(tokenizer, tuple(labels)), tokenizer,
                            hellaswag.load_items(str(write_items(tmp_path / "other.jsonl", other))), CPU)
    assert wrong.accuracy == 0.0
    assert "accuracy 1.0000" in result.describe()


def test_a_long_context_is_cut_from_the_left_so_the_ending_is_scored(tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir)
    model = trained_to_prefer(tokenizer, (0, 1, 2, 3))
    long = hellaswag.Item("the north " * 40 + CONTEXTS[0], tuple(ENDINGS[0]), 0)  # beyond 64 positions
    assert hellaswag.score(model, tokenizer, [long], CPU).items == 1


def test_limit_and_bad_input_name_the_item_or_the_file(tmp_path):
    path = write_items(tmp_path / "val.jsonl", [0, 1, 2, 3])
    assert len(hellaswag.load_items(str(path), limit=2)) == 2
    with pytest.raises(ValueError, match="no such file; give HellaSwag's validation JSONL"):
        hellaswag.load_items(str(tmp_path / "missing.jsonl"))
    path.write_text(path.read_text() + json.dumps({"ctx": "x", "label": 0}) + "\n")
    with pytest.raises(ValueError, match="line 5: not a HellaSwag item: endings must be a list of four strings"):
        hellaswag.load_items(str(path))
