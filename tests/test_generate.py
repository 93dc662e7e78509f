"""Generation parameters change the output as documented; the command line takes them too."""
import pytest
import torch
from transformers import AutoTokenizer, GPT2LMHeadModel

from nblib.export import generate
from nblib.setup.config import SamplingConfig


@pytest.fixture(scope="module")
def pretrained(pretrained_dir):
    """The tiny random GPT-2, made unlikely to end a sample at once (its end-of-text logit is 0)."""
    model = GPT2LMHeadModel.from_pretrained(str(pretrained_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(pretrained_dir))
    with torch.no_grad():
        model.transformer.wte.weight[tokenizer.eos_token_id] = 0.0
    return model, tokenizer


def sample(pretrained, **settings) -> list[str]:
    model, tokenizer = pretrained
    return generate.samples(model, tokenizer, SamplingConfig(prompts=("the river",), **settings))


def test_the_seed_repeats_samples_and_another_seed_changes_them(pretrained):
    first = sample(pretrained, seed=1, temperature=1.5, top_k=0, top_p=1.0)
    assert sample(pretrained, seed=1, temperature=1.5, top_k=0, top_p=1.0) == first
    assert sample(pretrained, seed=2, temperature=1.5, top_k=0, top_p=1.0) != first


def test_top_k_1_is_greedy_whatever_the_seed(pretrained):
    assert sample(pretrained, seed=1, top_k=1) == sample(pretrained, seed=2, top_k=1)


def test_num_return_sequences_gives_that_many_samples_per_prompt(pretrained):
    texts = sample(pretrained, num_return_sequences=3, max_new_tokens=5, temperature=1.5)
    assert len(texts) == 3 and len(set(texts)) > 1 and all(t.startswith("the river") for t in texts)


def test_max_new_tokens_bounds_the_continuation(pretrained):
    short, = sample(pretrained, top_k=1, max_new_tokens=3)
    long, = sample(pretrained, top_k=1, max_new_tokens=20)
    assert len("the river") < len(short) < len(long) and long.startswith(short)


def test_repetition_penalty_changes_greedy_output(pretrained):
    plain = sample(pretrained, top_k=1, max_new_tokens=30)
    assert sample(pretrained, top_k=1, max_new_tokens=30, repetition_penalty=5.0) != plain


def test_sampling_leaves_trainings_random_state_alone(pretrained):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    sample(pretrained, seed=9)
    assert torch.equal(torch.rand(3), expected)


def test_command_line_takes_the_generation_parameters(pretrained_dir, capsys):
    generate.main(["--model", str(pretrained_dir), "--prompt", "the city", "--prompt", "the king",
                   "--max-new-tokens", "4", "--num-return-sequences", "2", "--top-k", "1", "--seed", "3"])
    texts = [t for t in capsys.readouterr().out.split("\n\n") if t.strip()]
    assert len(texts) == 4 and texts[0].startswith("the city") and texts[2].startswith("the king")
    assert texts[0] == texts[1]  # top-k 1: both sequences are the greedy one


def test_a_checkpoint_needs_its_tokenizer(tmp_path):
    with pytest.raises(ValueError, match="is a checkpoint: give the tokenizer"):
        generate.load(tmp_path / "best_model.pt")


def test_a_model_loaded_to_sample_from_goes_to_the_notebooks_device(pretrained_dir):
    """`sample_from` loads on the CPU; the notebook's device here is `meta`, not the CPU's, so a
    model left on the CPU (sampling silently there while a GPU waits) shows."""
    from nblib.setup import hardware
    device = hardware.Device(torch.device("meta"), "fp32")
    loaded, tokenizer = generate.model_to_sample(str(pretrained_dir), None, None, device)
    assert {p.device for p in loaded.parameters()} == {torch.device("meta")} and tokenizer is not None
    mine = object()
    assert generate.model_to_sample("", mine, "tokenizer", device) == (mine, "tokenizer")
