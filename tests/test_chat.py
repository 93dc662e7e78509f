"""Conversations: the labels, the packing, the template, and a fine-tune through the notebook."""
import json
import random

import numpy as np
import pytest
import torch
from conftest import tiny_params
from test_notebook import execute, outputs_text
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel

from nblib import data
from nblib.data import chat
from nblib.evaluation import validation
from nblib.setup import hardware, params
from nblib.training import contract
from nblib.training.loss import IGNORE_INDEX, counted_targets

COLOURS = {"sky": "blue", "grass": "green", "snow": "white", "coal": "black", "blood": "red",
           "sun": "yellow", "sea": "blue", "night": "dark"}


def conversation(rng: random.Random) -> list[dict]:
    thing = rng.choice(list(COLOURS))
    return [{"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": f"What colour is the {thing}?"},
            {"role": "assistant", "content": f"Sure. The {thing} is {COLOURS[thing]}."},
            {"role": "user", "content": "Thanks, and the opposite?"},
            {"role": "assistant", "content": "I do not know that one."}]


def write_conversations(path, n: int, seed: int = 0):
    rng = random.Random(seed)
    path.write_text("".join(json.dumps({"messages": conversation(rng)}) + "\n" for _ in range(n)))
    return path


def chat_corpus(tmp_path, tokenizer_dir, **overrides) -> data.Corpus:
    dataset = write_conversations(tmp_path / "chat.jsonl", 60)
    cfg = params.resolve(tiny_params(tmp_path, dataset=str(dataset), tokenizer=str(tokenizer_dir), **overrides))
    return data.prepare(cfg)


def learnt_spans(corpus: data.Corpus, split: str) -> list[str]:
    """The texts of each run of tokens that carry loss, in stream order."""
    tokens, mask = np.asarray(corpus.tokens[split]), np.asarray(corpus.loss_masks[split])
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
    return [corpus.tokenizer.decode(tokens[a:b]) for a, b in zip(edges[::2], edges[1::2])]


def test_only_the_assistants_tokens_carry_loss(tmp_path, tokenizer_dir):
    corpus = chat_corpus(tmp_path, tokenizer_dir)
    assert corpus.is_chat and corpus.tokenizer.chat_template == chat.TEMPLATE
    spans = learnt_spans(corpus, "train")
    answers = {f" Sure. The {thing} is {colour}.<|endoftext|>" for thing, colour in COLOURS.items()}
    assert set(spans[::2]) <= answers and set(spans[1::2]) == {" I do not know that one.<|endoftext|>"}
    assert len(spans) == 2 * sum(1 for _ in open(tmp_path / "chat.jsonl")) * 0.9  # 10% held out, 2 answers each
    blocks = corpus.blocks("train")[np.arange(len(corpus.blocks("train")))]
    tokens, labels = blocks[:, 0], blocks[:, 1]
    learnt = labels != IGNORE_INDEX
    assert np.array_equal(labels[learnt], tokens[learnt]) and 0.2 < learnt.mean() < 0.6
    everything = np.arange(len(corpus.blocks("train")))
    assert corpus.blocks("train").counted_targets(everything) == counted_targets(blocks)  # from the masks alone


def test_no_loss_crosses_from_one_conversation_into_the_next(tmp_path, tokenizer_dir):
    corpus = chat_corpus(tmp_path, tokenizer_dir, train_on="all")
    tokens, mask = np.asarray(corpus.tokens["train"]), np.asarray(corpus.loss_masks["train"])
    ends = np.flatnonzero(tokens == corpus.tokenizer.eos_token_id)[1::2]  # two answers a conversation
    starts = np.concatenate([[0], ends[:-1] + 1])
    assert len(starts) == 54 and all(corpus.tokenizer.decode(tokens[s:s + 8]).startswith("Answer") for s in starts)
    assert not mask[starts].any()  # a conversation's first token is never predicted from the one before
    assert mask.sum() == len(tokens) - len(starts)  # train_on="all": every other token


def test_instruction_and_response_columns_are_conversations(tmp_path, tokenizer_dir):
    rows = [{"question": f"Colour of the {t}?", "answer": c} for t, c in COLOURS.items()] * 5
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = params.resolve(tiny_params(tmp_path, dataset=str(tmp_path / "pairs.jsonl"), tokenizer=str(tokenizer_dir),
                                     instruction_column="question", response_column="answer", max_length=8))
    corpus = data.prepare(cfg)
    assert corpus.is_chat
    assert corpus.tokenizer.decode(corpus.tokens["train"][:30]).startswith("User: Colour of the ")
    assert set(learnt_spans(corpus, "train")) <= {f" {c}<|endoftext|>" for c in COLOURS.values()}


@pytest.mark.parametrize("overrides, message", [
    (dict(data_format="chat", instruction_column="q"), r"data_format='chat': dataset=.* has no 'messages' column "
                                                       r"and not both instruction_column='q'"),
    (dict(train_on="prompts"), r"train_on='prompts': must be one of responses, all"),
])
def test_chat_parameters_are_checked(tmp_path, tokenizer_dir, wikitext_file, overrides, message):
    with pytest.raises(ValueError, match=message):
        data.prepare(params.resolve(tiny_params(tmp_path, dataset=str(wikitext_file), tokenizer=str(tokenizer_dir),
                                                **overrides)))


def test_a_malformed_conversation_is_named_by_its_files_line(tmp_path, tokenizer_dir):
    rows = [{"messages": conversation(random.Random(0))}] * 5 + [{"messages": [{"role": "robot", "content": "hi"}]}]
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"bad.jsonl:6: each message needs a role \(system, user, assistant\)"):
        data.prepare(params.resolve(tiny_params(tmp_path, dataset=str(tmp_path / "bad.jsonl"),
                                                tokenizer=str(tokenizer_dir))))


def test_changing_train_on_is_another_run(tmp_path, tokenizer_dir):
    responses = chat_corpus(tmp_path, tokenizer_dir)
    everything = chat_corpus(tmp_path, tokenizer_dir, train_on="all")
    assert responses.cache_dir != everything.cache_dir
    cfg = params.resolve(tiny_params(tmp_path, dataset=str(tmp_path / "chat.jsonl"), tokenizer=str(tokenizer_dir)))
    assert contract.fingerprint(cfg, responses)["data"] != contract.fingerprint(cfg, everything)["data"]


def test_a_template_that_renders_a_beginning_differently_is_refused_for_responses(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}|{% endfor %}{{ messages|length }}"
    with pytest.raises(ValueError, match="use train_on='all'"):
        chat.encode(tokenizer, conversation(random.Random(0)), "responses")


@pytest.mark.slow
@pytest.mark.compat
def test_chat_finetune_through_the_notebook_lowers_the_held_out_answer_loss(tmp_path, pretrained_dir):
    dataset = write_conversations(tmp_path / "chat.jsonl", 400)
    values = dict(preset="smoke", output_dir=str(tmp_path / "run"), init_from=str(pretrained_dir),
                  dataset=str(dataset), max_length=64, batch_size=8, gradient_accumulation_steps=1,
                  max_steps=400, eval_steps=200, save_steps=200, warmup_steps=10, learning_rate=5e-3, dropout=0.0,
                  prompts=["What colour is the snow?"], max_new_tokens=16)
    text = outputs_text(execute(tmp_path, **values))
    run = tmp_path / "run"
    cfg = params.resolve(values)
    corpus = data.prepare(cfg)  # the notebook's cache
    device = hardware.detect("fp32", 1)
    before = validation.evaluate(GPT2LMHeadModel.from_pretrained(str(pretrained_dir)),
                                 corpus.blocks("validation")[:cfg.train.eval_blocks], device, 8)
    history = json.loads((run / "training_history.json").read_text())
    assert history[-1]["val_loss"] < 0.5 * before  # held-out answers only (train_on="responses")
    assert "User: What colour is the snow?\nAssistant: " in text  # the generate cell's prompt, formatted

    final = run / "final_model"
    tokenizer = AutoTokenizer.from_pretrained(str(final))
    assert tokenizer.chat_template == chat.TEMPLATE  # saved with the export
    model = AutoModelForCausalLM.from_pretrained(str(final))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What colour is the coal?"}],
                                           add_generation_prompt=True, return_tensors="pt")
    prompt = prompt["input_ids"] if not torch.is_tensor(prompt) else prompt  # a BatchEncoding in transformers 5
    output = model.generate(prompt, do_sample=False, max_new_tokens=40, pad_token_id=tokenizer.eos_token_id)
    answer = output[0, prompt.shape[1]:].tolist()
    assert tokenizer.eos_token_id in answer  # the answer ends as the template's assistant turns do
    assert tokenizer.decode(answer[:answer.index(tokenizer.eos_token_id)]).startswith(" Sure. The ")


def test_ranks_weigh_answers_by_the_whole_steps_count(tmp_path, tokenizer_dir):
    """Two ranks' answer counts differ: each divides by the step's count per rank, so their averaged
    gradients are the one-process gradient of the whole step (the per-token mean over all)."""
    from nblib import model
    from nblib.training import optimization

    corpus = chat_corpus(tmp_path, tokenizer_dir)
    cfg = params.resolve(tiny_params(tmp_path, dataset=str(tmp_path / "chat.jsonl"), tokenizer=str(tokenizer_dir)))
    device = hardware.detect("fp32", 1)
    state = optimization.new_state(cfg, device, model.build(cfg.model, corpus.tokenizer), steps=4)
    blocks = corpus.blocks("train")[np.arange(8)]

    def gradients(part, targets_per_rank=None):
        state.model.zero_grad(set_to_none=True)
        optimization.accumulate_gradients(state, part, device, targets_per_rank)
        return [p.grad.clone() for p in state.model.parameters()]

    whole = gradients(blocks)
    per_rank = (blocks[:, 1, 1:] != IGNORE_INDEX).sum() / 2
    ranks = [gradients(part, per_rank) for part in (blocks[:2], blocks[2:])]  # uneven shares of answers
    assert all(torch.allclose((a + b) / 2, w, atol=1e-6) for a, b, w in zip(*ranks, whole))
