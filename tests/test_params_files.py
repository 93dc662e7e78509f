"""The example parameter files under notebooks/params: valid names and values, and papermill -f."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from nblib.setup import params

PARAMS = Path(__file__).resolve().parent.parent / "notebooks" / "params"
FILES = sorted(PARAMS.glob("*.yaml"))


def test_the_examples_exist():
    assert {f.stem for f in FILES} >= {"kaggle-t4", "cpu-demo", "smoke", "finetune-gpt2-lora", "finetune-local"}


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_each_file_names_only_notebook_parameters_and_resolves(path, tmp_path, pretrained_dir, wikitext_file):
    values = yaml.safe_load(path.read_text())
    assert set(values) <= set(params.PARAMETERS), set(values) - set(params.PARAMETERS)
    values["output_dir"] = str(tmp_path / "run")
    if "init_from" in values:  # the Hub or a previous run: a local stand-in of the same shape
        values.update(init_from=str(pretrained_dir), dataset=str(wikitext_file), max_length=32)
    if values.get("lora_r") and importlib.util.find_spec("peft") is None:
        with pytest.raises(ValueError, match="LoRA needs the optional peft package"):
            params.resolve(values)
        return
    cfg = params.resolve(values)
    assert cfg.preset == values["preset"]


@pytest.mark.slow
def test_papermill_reads_a_parameter_file(tmp_path):
    out = tmp_path / "out.ipynb"
    subprocess.run([sys.executable, "-m", "papermill", "notebooks/text_generation_kaggle_production.ipynb",
                    str(out), "-f", str(PARAMS / "smoke.yaml"), "-p", "output_dir", str(tmp_path / "run"),
                    "-p", "dry_run", "True", "-k", "python3"],
                   cwd=PARAMS.parent.parent, check=True, capture_output=True)
    text = "".join("".join(o.get("text", "")) for c in json.loads(out.read_text())["cells"]
                   for o in c.get("outputs", []))
    assert text.count("preset smoke, output_dir") == 1  # dry_run: the resolved configuration, once
    assert "max_steps = 40" in text and "prompts = ('Return the',)" in text


def run_job(*argv, cwd=PARAMS.parent.parent):
    return subprocess.run([sys.executable, "-m", "nblib.job", *map(str, argv)], cwd=cwd, capture_output=True,
                          text=True)


@pytest.mark.slow
def test_the_job_reads_papermills_file_with_overrides_and_shows_the_config(tmp_path):
    shown = run_job(PARAMS / "smoke.yaml", "--set", f"output_dir={tmp_path / 'run'}", "--set", "max_steps=7",
                    "--set", "prompts=[a, b]", "--set", "dataset_config=", "--set", "dropout=null", "--show-config")
    assert shown.returncode == 0, shown.stderr
    resolved = json.loads(shown.stdout)
    assert resolved["preset"] == "smoke" and resolved["train"]["max_steps"] == 7
    assert resolved["sampling"]["prompts"] == ["a", "b"] and resolved["data"]["dataset_config"] == ""
    assert resolved["model"]["dropout"] == params.resolve({"preset": "smoke"}).model.dropout  # null: the preset's
    assert resolved["output_dir"] == str(tmp_path / "run") and not (tmp_path / "run").exists()  # nothing trained


@pytest.mark.parametrize("argv, message", [
    (["--set", "max_step=7"], "max_step"),  # the parameter checks name it
    (["--set", "max_steps"], "--set 'max_steps': write --set name=value"),
    (["{missing}"], "No such file"),
    (["{list}"], "not a mapping of parameter names to values"),
])
@pytest.mark.slow
def test_the_job_refuses_bad_input_with_a_message_not_a_traceback(tmp_path, argv, message):
    (tmp_path / "list.yaml").write_text("- preset\n- smoke\n")
    argv = [a.format(missing=tmp_path / "missing.yaml", list=tmp_path / "list.yaml") for a in argv]
    refused = run_job(*argv, "--show-config")
    assert refused.returncode == 2 and message in refused.stderr and "Traceback" not in refused.stderr


def test_both_command_lines_take_parameters_as_papermill_does(tmp_path):
    """nblib.job and nblib.kaggle bundle share -f FILE, -p NAME VALUE and --set NAME=VALUE."""
    import argparse

    from nblib import job
    (tmp_path / "p.yaml").write_text("preset: smoke\nlearning_rate: 3e-4\n")
    parser = argparse.ArgumentParser()
    job.add_parameter_options(parser)
    args = parser.parse_args(["-f", str(tmp_path / "p.yaml"), "-p", "max_steps", "7", "--set", "seed=3"])
    assert job.parameter_values(args) == {"preset": "smoke", "learning_rate": 3e-4, "max_steps": 7, "seed": 3}
