"""The model card in every final_model/, and the upload to Kaggle Models, patched at kagglehub's
boundary (inside the notebook's kernel, through an IPython startup file)."""
import importlib.util
import json

import pytest
from conftest import needs, tiny_params
from test_notebook import execute, outputs_text

from nblib import history
from nblib.export import publish
from nblib.setup import params

RECORDER = """import json, os, kagglehub
# The kernel's kagglehub.model_upload records what it would send{failure}.
def model_upload(handle, local_model_dir, license_name=None, version_notes="", **kwargs):
    files = sorted(os.path.relpath(os.path.join(d, f), local_model_dir)
                   for d, _, names in os.walk(local_model_dir) for f in names)
    card = open(os.path.join(local_model_dir, "README.md")).read()
    with open({sent!r}, "w") as out:
        json.dump(dict(handle=handle, files=files, license=license_name, notes=version_notes, card=card), out)
    {raise_}
kagglehub.model_upload = model_upload
"""


def patch_kernel_upload(tmp_path, monkeypatch, fail: bool = False):
    """Kernels started from here on get a recording kagglehub.model_upload; returns its record file."""
    sent = tmp_path / "sent.json"
    startup = tmp_path / "ipython" / "profile_default" / "startup"
    startup.mkdir(parents=True)
    (startup / "patch_kagglehub.py").write_text(RECORDER.format(
        sent=str(sent), failure=", then fails as without credentials" if fail else "",
        raise_='raise RuntimeError("401 Unauthorized: no Kaggle credentials")' if fail else "pass"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    return sent


@pytest.mark.slow
@needs("kagglehub")
def test_the_notebook_uploads_final_model_with_its_card(tmp_path, monkeypatch):
    sent = patch_kernel_upload(tmp_path, monkeypatch)
    text = outputs_text(execute(tmp_path, preset="smoke", output_dir=str(tmp_path / "run"), max_steps=20,
                                upload_to="someone/gpt2-docs/transformers/default"))
    record = json.loads(sent.read_text())
    assert record["handle"] == "someone/gpt2-docs/transformers/default" and record["license"] == "Apache 2.0"
    assert {"README.md", "model.safetensors", "config.json", "tokenizer.json", "training_config.json",
            "training_curves.png"} <= set(record["files"])
    assert record["notes"].startswith("completed at step 20 of 20")
    assert "| best validation loss |" in record["card"] and "| test loss |" in record["card"]
    assert "uploaded " in text and "https://www.kaggle.com/models/someone/gpt2-docs" in text


@pytest.mark.slow
@needs("kagglehub")
def test_a_failed_upload_is_a_message_and_the_run_succeeds(tmp_path, monkeypatch):
    patch_kernel_upload(tmp_path, monkeypatch, fail=True)
    nb = execute(tmp_path, preset="smoke", output_dir=str(tmp_path / "run"), max_steps=10,
                 upload_to="someone/gpt2-docs/transformers/default")  # no cell fails
    text = outputs_text(nb)
    assert "upload_to='someone/gpt2-docs/transformers/default': the upload failed (RuntimeError: 401" in text
    assert "Check the Kaggle credentials" in text and "outputs in " in text  # the summary cell ran
    assert (tmp_path / "run" / "final_model" / "model.safetensors").is_file()


@pytest.mark.parametrize("handle, message", [
    ("someone/gpt2", r"upload_to='someone/gpt2': a Kaggle Models handle is owner/model/framework/variation"),
    ("a/b//d", r"a Kaggle Models handle is owner/model/framework/variation"),
])
def test_a_handle_that_is_not_one_is_refused_at_setup(tmp_path, handle, message):
    with pytest.raises(ValueError, match=message):
        params.resolve(tiny_params(tmp_path, upload_to=handle))


def test_without_kagglehub_upload_to_is_refused_at_setup(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "kagglehub" else real(name, *a))
    with pytest.raises(ValueError, match=r"uploading needs the kagglehub package \(pip install kagglehub"):
        params.resolve(tiny_params(tmp_path, upload_to="a/b/transformers/default"))


def test_the_card_says_what_the_model_is_and_how_to_load_it(tmp_path):
    cfg = params.resolve(tiny_params(tmp_path))
    model_dir = tmp_path / "run" / "final_model"
    model_dir.mkdir(parents=True)
    common = dict(epoch=0, train_loss=3.1, learning_rate=1e-3, grad_norm=1.0, tokens_per_second=100.0, mfu=0.1,
                  elapsed_seconds=1.0, timestamp="2026-11-29T00:00:00+00:00", batch_size=4,
                  gradient_accumulation_steps=2, skipped_steps=0)
    history.write(tmp_path / "run", [history.Record(step=4, tokens_seen=512, val_loss=3.0, **common),
                                     history.Record(step=8, tokens_seen=1024, val_loss=2.5, test_loss=2.6, **common)])
    card = publish.write_card(model_dir, cfg).read_text()
    assert "best validation loss | 2.5000 (perplexity 12.18, step 8)" in card
    assert "test loss | 2.6000 (perplexity 13.46)" in card and "| steps | 8 (1,024 tokens) |" in card
    assert 'pipeline("text-generation"' in card and "training_curves" not in card  # no curves yet
