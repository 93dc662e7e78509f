import json
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import portable_export
import pytest
import torch
from conftest import tiny_params
from transformers import GPT2Config, GPT2LMHeadModel, pipeline

from nblib import data, model
from nblib.export import generate, huggingface
from nblib.monitoring import plots
from nblib.setup import hardware, params
from nblib.setup.config import SamplingConfig
from nblib.training import loop, state

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def trained(tmp_path_factory, wikitext_file, tokenizer_dir) -> SimpleNamespace:
    """One tiny run, its best weights loaded back and exported: what the notebook's cells do."""
    cfg = params.resolve(tiny_params(tmp_path_factory.mktemp("export"), dataset=str(wikitext_file),
                                     tokenizer=str(tokenizer_dir)))
    state.seed_everything(0)
    corpus = data.prepare(cfg)
    net = model.build(cfg.model, corpus.tokenizer)
    result = loop.run(cfg, hardware.detect("fp32"), net, corpus)
    assert huggingface.load_best_weights(net, cfg.output_dir)
    final = huggingface.final_model(net, corpus.tokenizer, cfg.output_dir)
    return SimpleNamespace(cfg=cfg, out=cfg.output_dir, tokenizer=corpus.tokenizer, net=net, result=result, final=final)


def test_the_guides_load_snippet_takes_the_checkpoints_model_state_dict(trained):
    """The Kaggle guide's "Load from Checkpoint" snippet, as written: a model of the tokenizer's
    vocabulary (300 here, padded to 320 while training) takes model_state_dict."""
    checkpoint = torch.load(trained.out / "best_model.pt")
    m = trained.cfg.model
    fresh = GPT2LMHeadModel(GPT2Config(vocab_size=len(trained.tokenizer), n_positions=m.n_positions,
                                       n_embd=m.n_embd, n_layer=m.n_layer, n_head=m.n_head, n_inner=m.n_inner))
    fresh.load_state_dict(checkpoint["model_state_dict"])
    assert {"model_state_dict", "optimizer_state_dict", "scheduler_state_dict", "epoch", "step",
            "train_loss", "val_loss", "config"} <= set(checkpoint)


def test_final_model_is_tokenizer_sized_and_generates_in_a_pipeline(trained):
    assert trained.net.config.vocab_size == 320  # padded while training; the export is tokenizer-sized
    assert GPT2Config.from_pretrained(trained.final).vocab_size == len(trained.tokenizer)
    assert (trained.final / "model.safetensors").is_file() and (trained.final / "generation_config.json").is_file()
    text = pipeline("text-generation", model=str(trained.final))("the river", max_new_tokens=8)[0]["generated_text"]
    assert text.startswith("the river") and len(text) > len("the river")


def test_generate_samples_from_final_model(trained):
    loaded, tok = generate.load(trained.final)
    assert isinstance(loaded, GPT2LMHeadModel)
    samples = generate.samples(loaded, tok, SamplingConfig(prompts=("the old king",), max_new_tokens=5))
    assert samples[0].startswith("the old king")


def test_a_checkpoint_samples_with_the_runs_tokenizer(trained, capsys):
    """sample_from and `python -m nblib.export.generate --tokenizer` take a checkpoint .pt."""
    from_checkpoint, _ = generate.load(trained.out / "best_model.pt", trained.tokenizer)
    assert torch.equal(from_checkpoint.transformer.h[0].mlp.c_fc.weight, trained.net.transformer.h[0].mlp.c_fc.weight)
    generate.main(["--model", str(trained.out / "best_model.pt"), "--tokenizer", str(trained.final),
                   "--prompt", "the city", "--max-new-tokens", "3"])
    assert capsys.readouterr().out.startswith("the city")


def test_the_curves_and_the_summary_name_what_the_run_left(trained):
    plots.curves(trained.result.history, trained.out)
    assert (trained.out / "training_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "final_model/model.safetensors" in huggingface.summary(trained.out)


def test_generate_command_line(tiny_config, capsys):
    corpus = data.prepare(tiny_config)
    net = model.build(tiny_config.model, corpus.tokenizer)
    final = huggingface.final_model(net, corpus.tokenizer, tiny_config.output_dir)
    generate.main(["--model", str(final), "--prompt", "the city", "--max-new-tokens", "4"])
    assert capsys.readouterr().out.startswith("the city")


def test_non_finite_weights_are_never_exported(tiny_config):
    import pytest
    corpus = data.prepare(tiny_config)
    net = model.build(tiny_config.model, corpus.tokenizer)
    with torch.no_grad():
        net.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="weights are not finite"):
        huggingface.final_model(net, corpus.tokenizer, tiny_config.output_dir)
    assert not (tiny_config.output_dir / "final_model").exists()


def test_samples_from_a_padded_training_model_never_use_padding_rows(tiny_config):
    corpus = data.prepare(tiny_config)
    net = model.build(tiny_config.model, corpus.tokenizer)
    with torch.no_grad():  # every hidden state all ones, padding rows the likeliest tokens
        net.transformer.ln_f.weight.zero_()
        net.transformer.ln_f.bias.fill_(1.0)
        net.transformer.wte.weight[len(corpus.tokenizer):] = 5.0
    text = generate.samples(net, corpus.tokenizer, SamplingConfig(prompts=("the river",), max_new_tokens=6))[0]
    assert text.startswith("the river") and len(text) > len("the river")


OTHER_PYTHON = os.environ.get("NBLIB_OTHER_TRANSFORMERS_PYTHON")  # .ci/run: another environment's python


@pytest.mark.skipif(not OTHER_PYTHON, reason="set NBLIB_OTHER_TRANSFORMERS_PYTHON to a python with another "
                                             "major transformers (.ci/run does)")
@pytest.mark.slow
@pytest.mark.compat
def test_an_export_loads_under_the_other_major_transformers_and_back(tmp_path, tiny_config):
    """Trained on Kaggle (transformers 5) and loaded on a user's 4.x machine, and the reverse: the
    same token ids from AutoTokenizer and the guide's GPT2Tokenizer, the same logits."""
    state.seed_everything(0)
    corpus = data.prepare(tiny_config)
    net = model.build(tiny_config.model, corpus.tokenizer)
    here = huggingface.final_model(net, corpus.tokenizer, tmp_path / "here")
    there = tmp_path / "there" / "final_model"
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    run = [OTHER_PYTHON, str(Path(__file__).with_name("portable_export.py"))]
    seen_there = json.loads(subprocess.run(run + ["load", str(here)], env=environment, check=True,
                                           capture_output=True, text=True).stdout.splitlines()[-1])
    subprocess.run(run + ["export", str(here), str(there.parent)], env=environment, check=True, capture_output=True)
    for seen, other in ((portable_export.read(str(here)), seen_there),
                        (portable_export.read(str(there)), portable_export.read(str(here)))):
        assert seen["fast"] == seen["slow"] == other["fast"] == other["slow"]
        assert seen["model_max_length"] == other["model_max_length"] == tiny_config.model.n_positions
        assert seen["generated"] == other["generated"]
        torch.testing.assert_close(torch.tensor(seen["logits"]), torch.tensor(other["logits"]))
    modes = [{oct(p.stat().st_mode & 0o777) for p in folder.iterdir()} for folder in (there, here)]
    assert modes[0] == modes[1]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_export_dtype_halves_the_weights_and_leaves_the_trained_model_alone(trained, tmp_path, dtype, moves):
    from safetensors import safe_open

    final = huggingface.final_model(trained.net, trained.tokenizer, tmp_path, export_dtype=dtype)
    assert not [call for call in moves if call[0] is trained.net]  # a copy is cast, never the notebook's model
    with safe_open(str(final / "model.safetensors"), "pt") as weights:
        assert {weights.get_tensor(k).dtype for k in weights.keys()} == {getattr(torch, dtype)}
    full = (trained.final / "model.safetensors").stat().st_size
    assert (final / "model.safetensors").stat().st_size < 0.55 * full
    assert all(p.dtype == torch.float32 for p in trained.net.parameters())  # the notebook samples from it next
    text = pipeline("text-generation", model=str(final))("The", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert text.startswith("The")
