import json
import subprocess
import sys

import papermill
import pytest
from conftest import hide_installed_nblib

from nblib import kaggle
from nblib.setup.params import resolve


def test_the_repository_metadata_passes_the_kaggle_cli_checks():
    meta = json.loads(kaggle.METADATA.read_text())
    assert kaggle.validate_metadata(meta, kaggle.REPO) == []
    assert meta["enable_gpu"] is True and meta["enable_internet"] is True
    assert meta["machine_shape"] == "NvidiaTeslaT4" and meta["kernel_type"] == "notebook"


@pytest.mark.parametrize("change, message", [
    ({"title": "GPT"}, r"title 'GPT': must be at least five characters"),
    ({"title": "Another Title"}, r"slugifies to 'another-title', not the id's"),
    ({"id": "no-owner-slug"}, r"must be '<username>/<kernel-slug>'"),
    ({"id": "me/abc", "title": "abc"}, r"the kernel slug must be at least five characters"),
    ({"code_file": "missing.ipynb"}, r"code_file 'missing.ipynb': no such file"),
    ({"language": "julia"}, r"language 'julia': must be one of"),
    ({"kernel_type": "app"}, r"kernel_type 'app': must be one of"),
    ({"dataset_sources": ["wikitext"]}, r"dataset_sources 'wikitext': must be '<username>/<dataset-slug>'"),
    ({"kernel_sources": ["me/abc"]}, r"kernel_sources 'me/abc'"),
    ({"model_sources": ["google/gemma/pytorch/2b/latest"]}, r"model_sources .*<version number>"),
])
def test_each_cli_rule_is_checked(change, message):
    meta = {**json.loads(kaggle.METADATA.read_text()), **change}
    assert any(__import__("re").search(message, p) for p in kaggle.validate_metadata(meta, kaggle.REPO)), \
        kaggle.validate_metadata(meta, kaggle.REPO)


def test_stage_writes_a_push_ready_folder(tmp_path):
    out = kaggle.stage(tmp_path / "kernel")
    meta = json.loads((out / "kernel-metadata.json").read_text())
    assert meta["code_file"] == kaggle.NOTEBOOK.name and (out / meta["code_file"]).is_file()
    assert kaggle.validate_metadata(meta, out) == []
    staged = json.loads((out / meta["code_file"]).read_text())["metadata"]["kaggle"]
    assert staged == {"accelerator": "nvidiaTeslaT4", "dataSources": [], "isGpuEnabled": True,
                      "isInternetEnabled": True, "language": "python", "sourceType": "notebook"}


@pytest.mark.slow
@pytest.mark.compat
def test_the_staged_notebook_trains_where_nblib_is_not_importable(tmp_path, monkeypatch):
    out = kaggle.stage(tmp_path / "kernel")
    empty = tmp_path / "empty" / "work"
    empty.mkdir(parents=True)
    hide_installed_nblib(tmp_path, monkeypatch)
    probe = subprocess.run([sys.executable, "-c", "import nblib"], cwd=empty, capture_output=True)
    assert probe.returncode != 0  # nothing outside the notebook provides nblib here
    nb = papermill.execute_notebook(
        str(out / kaggle.NOTEBOOK.name), str(empty / "out.ipynb"), kernel_name="python3",
        parameters={"preset": "smoke", "output_dir": str(empty / "run")}, cwd=str(empty), progress_bar=False)
    printed = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "unpacked the embedded nblib" in printed
    assert (empty / "run" / "final_model" / "model.safetensors").is_file()


def test_bundle_command_round_trip(tmp_path, wikitext_file, tokenizer_dir):
    from conftest import tiny_params

    from nblib import data
    params = tiny_params(tmp_path / "prep", dataset=str(wikitext_file), tokenizer=str(tokenizer_dir))
    (tmp_path / "params.json").write_text(json.dumps(params))
    kaggle.main(["bundle", str(tmp_path / "bundle"), "-f", str(tmp_path / "params.json"),
                 "-p", "seed", "7", "--id", "me/gpt2-tokens"])
    corpus = data.prepare(resolve({**params, "seed": 7, "dataset": str(tmp_path / "bundle"),
                                          "output_dir": str(tmp_path / "run")}))
    assert corpus.cache_dir == tmp_path / "bundle" and len(corpus.blocks("train")) > 0
