"""A resume never silently mixes two runs: what is bound is refused by name, what may change is applied."""
import dataclasses
import json
import re
import shutil
from pathlib import Path

import nbformat
import papermill
import pytest
import torch
from conftest import tiny_params, wikitext_lines
from nbclient import NotebookClient
from test_notebook import NOTEBOOK, execute, outputs_text

from nblib import data, model
from nblib.data import tokenizer
from nblib.evaluation import validation
from nblib.setup import hardware, params
from nblib.training import checkpoint, contract, loop, schedule, state

README = Path(__file__).resolve().parent.parent / "docs" / "resume-contract.md"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A completed smoke run of 20 steps (checkpoints at 10 and 20), copied by each test."""
    tmp = tmp_path_factory.mktemp("finished")
    execute(tmp, preset="smoke", output_dir=str(tmp / "run"), max_steps=20)
    return tmp / "run"


def copy_of(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def test_every_parameter_is_classified_and_the_readme_table_says_the_same():
    assert set(contract.RULES) == set(params.PARAMETERS)
    rows = re.findall(r"^\| (`\w+`(?:, `\w+`)*) \| (identity|bound|may change|free) \|", README.read_text(), re.M)
    table = {name: kind for names, kind in rows for name in re.findall(r"`(\w+)`", names)}
    assert table == {name: kind for name, (kind, _) in contract.RULES.items()}


@pytest.mark.slow
def test_a_lowered_learning_rate_a_longer_run_and_a_new_split_are_applied_on_resume(finished_run, tmp_path):
    """The issue's case: the smoke run again with another peak and more steps (and the same global
    batch split 4 x 4 instead of 8 x 2) trains at the new rate, from the resumed step."""
    run = copy_of(finished_run, tmp_path)
    nb = execute(tmp_path, preset="smoke", output_dir=str(run), learning_rate=1e-4, max_steps=30,
                 batch_size=4, gradient_accumulation_steps=4, save_steps=1, max_checkpoints=20, eval_steps=5)
    text = outputs_text(nb)
    for line in ("learning_rate 0.003 -> 0.0001 from step 20", "max_steps 20 -> 30 from step 20",
                 "batch_size 8 -> 4 from step 20", "gradient_accumulation_steps 2 -> 4 from step 20"):
        assert text.count(line) == 1, line

    history = json.loads((run / "training_history.json").read_text())
    expected = {r["step"]: 1e-4 * schedule.lr_factor(r["step"], 5, 30) for r in history if r["step"] > 20}
    assert {r["step"]: r["learning_rate"] for r in history if r["step"] > 20} == pytest.approx(expected, rel=1e-12)
    assert all(r["batch_size"] == 4 and r["gradient_accumulation_steps"] == 4 for r in history if r["step"] > 20)
    changed = {e["parameter"]: e for r in history for e in r["events"] if e["event"] == "changed"}
    assert changed["learning_rate"] == {"step": 20, "event": "changed", "parameter": "learning_rate",
                                        "old": 0.003, "new": 0.0001}

    # What the optimizer applied: its learning rate, and the size of the updates it made.
    before, after = (checkpoint.load(checkpoint.checkpoint_path(run, 0, s)) for s in (21, 22))
    lr_of_step_22 = 1e-4 * schedule.lr_factor(21, 5, 30)
    assert before["optimizer_state_dict"]["param_groups"][0]["lr"] == pytest.approx(lr_of_step_22, rel=1e-12)
    update = torch.cat([(after["model_state_dict"][k] - w).abs().flatten()
                        for k, w in before["model_state_dict"].items()]).mean().item()
    assert 0.05 < update / lr_of_step_22 < 2  # 0.24 measured; the old peak (3e-3) would give 30x more
    recorded = json.loads((run / "run_config.json").read_text())
    assert recorded["train"]["learning_rate"] == 1e-4
    assert recorded["fingerprint"] == after["config"]["fingerprint"] == before["config"]["fingerprint"]


@pytest.mark.slow
def test_another_dataset_with_the_same_tokenizer_spec_is_refused_and_nothing_is_overwritten(finished_run, tmp_path):
    run = copy_of(finished_run, tmp_path)
    exported = (run / "final_model" / "tokenizer.json").read_bytes()
    other = tmp_path / "other.txt"
    other.write_text("".join(wikitext_lines(300)))
    with pytest.raises(papermill.PapermillExecutionError) as error:
        execute(tmp_path, preset="smoke", output_dir=str(run), dataset=str(other), max_steps=30)
    message = str(error.value)
    assert "(step 20) cannot be continued with this run's settings" in message
    assert re.search(r"tokenizer: checkpoint bpe:512 \(512 tokens\), sha256 \w+, this run bpe:512", message)
    assert "data: checkpoint dataset='builtin:python-docs'" in message and f"this run dataset='{other}'" in message
    assert "another output_dir" in message
    assert (run / "final_model" / "tokenizer.json").read_bytes() == exported
    assert checkpoint.list_checkpoints(run / "checkpoints")[-1][0] == 20


@pytest.mark.slow
def test_a_changed_max_length_or_seed_is_refused_in_the_setup_cell(finished_run, tmp_path):
    run = copy_of(finished_run, tmp_path)
    with pytest.raises(papermill.PapermillExecutionError) as error:
        execute(tmp_path, preset="smoke", output_dir=str(run), max_length=32, seed=7)
    message = str(error.value)
    assert "max_length: checkpoint 64, this run 32" in message
    assert "seed: checkpoint 42, this run 7 (the data order and the held-out split follow it)" in message
    written = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    data_cell = next(c for c in written.cells if "run.data(" in c.source)  # refused in setup: no data work
    assert "".join(o.get("text", "") for o in data_cell.outputs).startswith(
        "skipped: the run stopped in the Setup cell (refused: RunMismatch)")



@pytest.mark.slow
def test_a_changed_global_batch_is_refused_naming_the_product_to_keep(finished_run, tmp_path):
    run = copy_of(finished_run, tmp_path)
    with pytest.raises(papermill.PapermillExecutionError,
                       match=r"global batch: checkpoint 16 blocks per optimizer step, this run 8 x 4 = 32 "
                             r".*keep batch_size x gradient_accumulation_steps = 16\)"):
        execute(tmp_path, preset="smoke", output_dir=str(run), gradient_accumulation_steps=4, max_steps=30)


@pytest.mark.slow
def test_validation_loss_is_the_same_whatever_the_micro_batch(tmp_path):
    """The same global batch split 16 x 1 and 2 x 8: the same blocks are evaluated, so the losses
    differ only by float rounding (before, the evaluated subset grew with the micro-batch)."""
    losses = []
    for batch_size, accumulation in ((16, 1), (2, 8)):
        run = tmp_path / f"run{batch_size}"
        execute(tmp_path, preset="smoke", output_dir=str(run), batch_size=batch_size,
                gradient_accumulation_steps=accumulation, max_steps=10, precision="fp32")
        losses.append(json.loads((run / "training_history.json").read_text())[-1]["val_loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_evaluation_weights_every_token_the_same_whatever_the_eval_batch(tiny_config):
    corpus = data.prepare(tiny_config)
    net = model.build(tiny_config.model, corpus.tokenizer)
    device = hardware.detect("fp32", 1)
    blocks = corpus.blocks("validation")[:13]
    losses = [validation.evaluate(net, blocks, device, batch) for batch in (1, 4, 13)]
    assert losses == pytest.approx([losses[0]] * 3, rel=1e-6)
    with pytest.raises(ValueError, match="no blocks to evaluate"):
        validation.evaluate(net, blocks[:0], device, 4)


@pytest.mark.slow
def test_a_live_kernel_rerunning_setup_to_train_applies_the_new_learning_rate(tmp_path):
    """The interactive user: Run All, then `learning_rate = 1e-4`, `max_steps = 30` in a new cell,
    and the cells from setup to train run again in the same kernel (which holds the folder's lock)."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    chosen = nbformat.v4.new_code_cell(f"preset = 'smoke'\noutput_dir = {str(tmp_path / 'run')!r}\nmax_steps = 20")
    nb.cells.insert(next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])) + 1, chosen)
    code = [c for c in nb.cells if c.cell_type == "code"]
    setup, train_cell = (next(i for i, c in enumerate(code) if marker in c.source)
                         for marker in ("nblib.run.start", "run.train("))
    nb.cells.append(nbformat.v4.new_code_cell("learning_rate = 1e-4\nmax_steps = 30"))
    client = NotebookClient(nb, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    with client.setup_kernel():
        for cell in code + [nb.cells[-1]] + code[setup:train_cell + 1]:
            cell.outputs = []
            client.execute_cell(cell, nb.cells.index(cell))
    shown = "".join(o.get("text", "") for o in code[train_cell].outputs)
    assert "learning_rate 0.003 -> 0.0001 from step 20" in shown and "max_steps 20 -> 30 from step 20" in shown
    history = json.loads((tmp_path / "run" / "training_history.json").read_text())
    assert history[-1]["step"] == 30 and history[-1]["learning_rate"] == pytest.approx(1e-5, rel=1e-12)


def test_train_run_twice_in_one_process_applies_the_new_learning_rate_and_weight_decay(tiny_config, tmp_path):
    device = hardware.detect("fp32", 1)
    corpus = data.prepare(tiny_config)
    state.seed_everything(0)
    loop.run(tiny_config, device, model.build(tiny_config.model, corpus.tokenizer), corpus)
    values = tiny_params(tmp_path, dataset=tiny_config.data.dataset, tokenizer=tiny_config.data.tokenizer,
                         learning_rate=1e-4, weight_decay=0.5, max_steps=16, resume_from_checkpoint="auto")
    again = params.resolve(values)
    result = loop.run(again, device, model.build(again.model, corpus.tokenizer), corpus)
    groups = result.state.optimizer.param_groups
    assert groups[0]["lr"] == pytest.approx(1e-4 * schedule.lr_factor(16, 2, 16), rel=1e-12)
    assert (groups[0]["weight_decay"], groups[1]["weight_decay"]) == (0.5, 0.0)
    assert result.state.schedule.peak == 1e-4
    events = [e["parameter"] for r in result.history for e in r.events if e["event"] == "changed"]
    assert events == ["learning_rate", "weight_decay", "max_steps"]


def test_the_fingerprint_holds_the_tokenizers_content_not_its_name(tiny_config):
    texts = ["".join(wikitext_lines(30, seed=1))] * 3
    one, same, other = (tokenizer.train_bpe(t, 300) for t in (texts, texts, ["".join(wikitext_lines(30, seed=2))] * 3))
    assert contract.tokenizer_digest(one) == contract.tokenizer_digest(same) != contract.tokenizer_digest(other)
    corpus = data.prepare(tiny_config)
    printed = contract.fingerprint(tiny_config, corpus)
    assert {"tokenizer", "data", "max_length", "stride", "n_embd", "init_from"} <= set(printed)
    assert printed["tokenizer"]["sha256"] == contract.tokenizer_digest(corpus.tokenizer)


def test_a_checkpoint_from_before_fingerprints_is_checked_by_its_config(tiny_config, tmp_path):
    saved = {"step": 4, "global_batch": 8, "config": tiny_config.to_dict()}
    assert contract.check(saved, tiny_config, 1) == []
    wider = params.resolve({**tiny_params(tmp_path, dataset=tiny_config.data.dataset,
                                          tokenizer=tiny_config.data.tokenizer), "n_embd": 64})
    with pytest.raises(contract.RunMismatch, match=r"n_embd: checkpoint 32, this run 64"):
        contract.check(saved, wider, 1, path="old.pt")


def test_auto_passes_over_another_runs_checkpoint_attached_as_input_but_refuses_one_in_output_dir(
        tiny_config, tmp_path, monkeypatch, caplog):
    """A Kaggle user attaches an unrelated run's output (say, for its data cache): its newer
    checkpoint is passed over for this run's own; the same checkpoint in output_dir is refused."""
    saved = {"step": 4, "global_batch": 8, "config": tiny_config.to_dict()}
    other = {"step": 900, "global_batch": 8,
             "config": {**tiny_config.to_dict(), "train": {**tiny_config.to_dict()["train"], "max_length": 8}}}
    attached = tmp_path / "input" / "someone-elses-run"
    checkpoint.save(checkpoint.checkpoint_path(attached, 0, 900), other)
    checkpoint.save(checkpoint.checkpoint_path(tiny_config.output_dir, 0, 4), saved)
    monkeypatch.setattr(checkpoint.paths, "KAGGLE_INPUT", tmp_path / "input")
    auto = params.resolve(tiny_params(tmp_path, dataset=tiny_config.data.dataset,
                                      tokenizer=tiny_config.data.tokenizer, resume_from_checkpoint="auto"))
    path, found, changes = contract.find(auto, 1)
    assert found["step"] == 4 and changes == []
    assert "passing over" in caplog.text and "max_length: checkpoint 8, this run 16" in caplog.text
    checkpoint.save(checkpoint.checkpoint_path(tiny_config.output_dir, 0, 900), other)
    with pytest.raises(contract.RunMismatch,
                       match=rf"(?s)step 900\) cannot be continued.*out of {tiny_config.output_dir}"):
        contract.find(auto, 1)


def test_a_global_batch_the_processes_cannot_share_is_refused_before_any_data_work(tiny_config):
    odd = dataclasses.replace(tiny_config, train=dataclasses.replace(tiny_config.train, batch_size=9,
                                                                      gradient_accumulation_steps=1))
    saved = {"step": 4, "global_batch": 9, "world_size": 1, "config": odd.to_dict()}
    with pytest.raises(contract.RunMismatch, match=r"global batch of 9 blocks cannot be shared evenly by 2 "
                                                   r"processes; use devices=1"):
        contract.check(saved, odd, 2)
