"""The real notebook, executed headless with papermill, as CI and Kaggle users run it."""
import ast
import json
import math
import typing
from pathlib import Path

import datasets
import papermill
import pytest
import torch
from conftest import fake_clock, hide_installed_nblib, wikitext_lines
from transformers import pipeline

from nblib.setup import params
from nblib.training import checkpoint

pytestmark = pytest.mark.slow  # notebooks, worker processes or commands: minutes in all


NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "text_generation_kaggle_production.ipynb"


def execute(tmp_path, **parameters):
    return papermill.execute_notebook(
        str(NOTEBOOK), str(tmp_path / "out.ipynb"), parameters=parameters, kernel_name="python3",
        cwd=str(NOTEBOOK.parent), progress_bar=False)


def outputs_text(nb) -> str:
    return "".join(o.get("text", "") + o.get("evalue", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.outputs)


@pytest.mark.compat
def test_smoke_preset_trains_and_writes_every_output(tmp_path):
    run = tmp_path / "run"
    items = [{"ctx": "Return the", "endings": ["value of x.", "list of files.", "a b c d", "number."], "label": i % 4}
             for i in range(5)]
    (tmp_path / "hellaswag_val.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))
    nb = execute(tmp_path, preset="smoke", output_dir=str(run), eval_hellaswag=str(tmp_path / "hellaswag_val.jsonl"),
                 hellaswag_items=4)

    history = json.loads((run / "training_history.json").read_text())
    assert history[-1]["hellaswag_items"] == 4 and 0 <= history[-1]["hellaswag_accuracy"] <= 1
    assert "HellaSwag (" in outputs_text(nb) and "4 items): accuracy" in outputs_text(nb)  # the cell and the summary
    val = [r["val_loss"] for r in history]
    assert len(val) >= 3 and val[-1] < val[0] and history[-1]["train_loss"] < history[0]["train_loss"]

    best = torch.load(run / "best_model.pt", weights_only=True)
    assert {"model_state_dict", "optimizer_state_dict", "scheduler_state_dict", "epoch", "step",
            "train_loss", "val_loss", "config"} <= set(best)
    assert best["val_loss"] == min(val)
    checkpoints = list((run / "checkpoints").glob("checkpoint_epoch*_step*.pt"))
    assert 0 < len(checkpoints) <= best["config"]["train"]["max_checkpoints"]
    assert (run / "training_curves.png").stat().st_size > 0
    train_cell = next(c for c in nb.cells if "run.train(" in c.source)
    pictures = [o for o in train_cell.outputs if "image/png" in o.get("data", {})]
    assert len(pictures) == 1  # the live curves: one display, redrawn in place at each evaluation
    assert "step 40/40: train loss" in "".join(o.get("text", "") for o in train_cell.outputs)  # the log lines stay
    assert "session clock: about" in outputs_text(nb) and all(0 < r["mfu"] < 1 for r in history)
    card = (run / "final_model" / "README.md").read_text()
    assert "| best validation loss |" in card and "![loss and validation perplexity](training_curves.png)" in card

    generator = pipeline("text-generation", model=str(run / "final_model"))
    assert generator("Return the", max_new_tokens=10)[0]["generated_text"].startswith("Return the")


def test_dry_run_prints_the_config_and_stops_cleanly(tmp_path):
    nb = execute(tmp_path, preset="smoke", output_dir=str(tmp_path / "run"), dry_run=True)
    text = outputs_text(nb)
    assert "one process: global batch 8 x 2 = 16 blocks" in text and "precision" in text
    assert not (tmp_path / "run" / "data_cache").exists()


def test_bad_parameter_stops_the_setup_cell_with_a_clear_message(tmp_path):
    with pytest.raises(papermill.PapermillExecutionError, match=r"n_embd=100: must be divisible by n_head=3"):
        execute(tmp_path, preset="smoke", output_dir=str(tmp_path / "run"), n_embd=100, n_head=3)


def test_hub_shaped_stand_ins_parquet_wikitext_and_saved_tokenizer(tmp_path, tokenizer_dir):
    """What the Hub gives on Kaggle (a WikiText-layout `text` column with its own splits, a saved
    GPT-2-style tokenizer), from local files of the same shape."""
    data_dir = tmp_path / "wikitext"
    data_dir.mkdir()
    for split, n in (("train", 80), ("validation", 10), ("test", 10)):
        datasets.Dataset.from_dict({"text": wikitext_lines(n, seed=len(split))}).to_parquet(
            str(data_dir / f"{split}.parquet"))
    run = tmp_path / "run"
    execute(tmp_path, preset="smoke", output_dir=str(run), dataset=str(data_dir / "*.parquet"),
            tokenizer=str(tokenizer_dir), max_steps=12, eval_steps=6, save_steps=6)
    assert len(json.loads((run / "training_history.json").read_text())) == 2
    assert json.loads((run / "final_model" / "tokenizer_config.json").read_text())


def test_time_budget_ends_normally_with_an_export_and_the_next_run_resumes(tmp_path, monkeypatch):
    fake_clock(tmp_path, monkeypatch)  # each kernel's session: 30 clock seconds, a second per reading
    run = tmp_path / "run"
    params = dict(preset="smoke", output_dir=str(run), max_steps=1_000_000, save_steps=100_000,
                  eval_steps=200, time_budget_minutes=0.5)
    nb = execute(tmp_path, **params)  # papermill raises on any failed cell: this one ends normally
    assert "stopped at the time budget at step" in outputs_text(nb)
    assert (run / "final_model" / "model.safetensors").is_file()
    assert (run / "training_curves.png").is_file()
    first_stop = checkpoint.list_checkpoints(run / "checkpoints")[-1][0]

    execute(tmp_path, **params)
    second_stop = checkpoint.list_checkpoints(run / "checkpoints")[-1][0]
    history = json.loads((run / "training_history.json").read_text())
    assert second_stop > first_stop and history[-1]["step"] > first_stop
    steps = [r["step"] for r in history]
    assert steps == sorted(set(steps))  # the history continues: no step recorded twice


def test_the_parameters_cell_holds_the_tables_names_defaults_and_types():
    cell = papermill.inspect_notebook(str(NOTEBOOK))
    assert list(cell) == list(params.PARAMETERS)
    assert {name: ast.literal_eval(p["default"]) for name, p in cell.items()} == params.DEFAULTS
    annotations = {name: eval(p["inferred_type_name"], vars(typing)) for name, p in cell.items()}
    assert {name: union_arms(t) for name, t in annotations.items()} == {
        name: union_arms(params.parameter_type(name)) for name in params.PARAMETERS}


def union_arms(annotation) -> frozenset:
    return frozenset(typing.get_args(annotation)) if typing.get_args(annotation) else frozenset([annotation])


def test_without_nblib_installed_the_setup_cell_names_the_install_command(tmp_path, monkeypatch):
    hide_installed_nblib(tmp_path, monkeypatch)
    with pytest.raises(papermill.PapermillExecutionError, match=r"nblib is not installed: run `pip install -e \.`"):
        execute(tmp_path, preset="smoke", output_dir=str(tmp_path / "run"))


def test_a_misspelt_parameter_stops_the_setup_cell_naming_the_likely_one(tmp_path):
    with pytest.raises(papermill.PapermillExecutionError,
                       match=r"unknown parameter learnin_rate; did you mean learning_rate\?"):
        execute(tmp_path, preset="smoke", output_dir=str(tmp_path / "run"), learnin_rate=0.1)
    assert not (tmp_path / "run").exists()


def test_a_validation_file_too_short_for_one_block_is_refused_before_training(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "train.txt").write_text("".join(wikitext_lines(200)))
    (data_dir / "valid.txt").write_text(" = Short = \n a few words .\n")
    with pytest.raises(papermill.PapermillExecutionError,
                       match=r"the validation split holds \d+ tokens, fewer than the 65 one block needs"):
        execute(tmp_path, preset="smoke", output_dir=str(tmp_path / "run"), dataset=str(data_dir / "*.txt"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def _damaged_tokenizer(tmp_path, tokenizer_dir):
    damaged = tmp_path / "tokenizer"
    damaged.mkdir()
    for name in ("tokenizer_config.json", "tokenizer.json"):
        (damaged / name).write_bytes((tokenizer_dir / name).read_bytes())
    text = (damaged / "tokenizer.json").read_bytes()
    (damaged / "tokenizer.json").write_bytes(text[: len(text) // 2])  # an upload cut short
    return dict(tokenizer=str(damaged)), rf"tokenizer='{damaged}': {damaged}/tokenizer.json is damaged or truncated"


DATA_ERRORS = {
    "empty file": lambda tmp_path, _: (
        (tmp_path / "empty.txt").write_text(" \n\n"),
        dict(dataset=str(tmp_path / "empty.txt")), r"empty.txt is empty \(3 bytes, no text\)")[1:],
    "not UTF-8": lambda tmp_path, _: (
        (tmp_path / "latin1.txt").write_bytes("".join(wikitext_lines(5)).encode() + "café".encode("latin-1")),
        dict(dataset=str(tmp_path / "latin1.txt")),
        r"latin1.txt is not UTF-8 text: the byte 0xe9 at offset [\d,]+ cannot be decoded")[1:],
    "numbers in the text column": lambda tmp_path, _: (
        (tmp_path / "numbers.jsonl").write_text('{"text": "one line"}\n{"text": 42}\n'),
        dict(dataset=str(tmp_path / "numbers.jsonl")),
        r"text_column='text': .*numbers.jsonl:2 holds int 42 there, not text")[1:],
    "truncated tokenizer.json": _damaged_tokenizer,
}


@pytest.mark.parametrize("case", DATA_ERRORS)
def test_data_errors_name_the_file_and_the_fix(tmp_path, tokenizer_dir, case):
    parameters, message = DATA_ERRORS[case](tmp_path, tokenizer_dir)
    with pytest.raises(papermill.PapermillExecutionError, match=message) as error:
        execute(tmp_path, preset="smoke", output_dir=str(tmp_path / "run"), **parameters)
    assert "site-packages" not in str(error.value)  # raised by nblib's checks, not deep in a library


def test_fp16_with_a_grad_scaler_the_t4s_path_runs_through_the_notebook(tmp_path):
    """precision='fp16' is what 'auto' picks on a T4; on a CPU it runs too (slowly), so CI covers it."""
    from safetensors.torch import load_file

    run = tmp_path / "run"
    nb = execute(tmp_path, preset="smoke", output_dir=str(run), precision="fp16", max_steps=10, eval_steps=5)
    assert "precision fp16" in outputs_text(nb)
    history = json.loads((run / "training_history.json").read_text())
    assert all(math.isfinite(r["val_loss"]) for r in history) and history[-1]["val_loss"] < history[0]["val_loss"]
    saved = torch.load(run / "checkpoints" / "checkpoint_epoch0_step10.pt", weights_only=True)
    assert saved["scaler_state_dict"]["scale"] > 0 and saved["config"]["train"]["precision"] == "fp16"
    weights = load_file(str(run / "final_model" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_run_all_with_the_default_gpu_preset_on_a_cpu_stops_in_the_setup_cell(tmp_path):
    """Import Notebook without choosing an accelerator lands on a CPU: the default job would take
    days there, so Run All stops at once and says what to choose."""
    with pytest.raises(papermill.PapermillExecutionError,
                       match=r"preset 'kaggle-t4' is meant for a GPU.*Settings -> Accelerator -> GPU T4 x2"):
        execute(tmp_path, output_dir=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
