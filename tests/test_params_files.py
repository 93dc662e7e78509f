"""The example parameter files under notebooks/params: valid names and values, and papermill -f."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from nblib import params

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


def test_papermill_reads_a_parameter_file(tmp_path):
    out = tmp_path / "out.ipynb"
    subprocess.run([sys.executable, "-m", "papermill", "notebooks/text_generation_kaggle_production.ipynb",
                    str(out), "-f", str(PARAMS / "smoke.yaml"), "-p", "output_dir", str(tmp_path / "run"),
                    "-p", "dry_run", "True", "-k", "python3"],
                   cwd=PARAMS.parent.parent, check=True, capture_output=True)
    text = "".join("".join(o.get("text", "")) for c in json.loads(out.read_text())["cells"]
                   for o in c.get("outputs", []))
    resolved = json.loads(text[text.index("{\n"):text.rindex("}") + 1])  # dry_run prints the whole config
    assert resolved["preset"] == "smoke" and resolved["train"]["max_steps"] == 40
    assert resolved["sampling"]["prompts"] == ["Return the"]
