"""report_to: TensorBoard event files, Weights & Biases when installed and logged in, and a clear
message (the run going on) when the tool is missing."""
import logging
import sys
import types

from conftest import needs, tiny_params
from test_train import run_tiny

from nblib.monitoring import report
from nblib.setup import params


@needs("tensorboard")
def test_tensorboard_event_files_hold_the_scalars(tmp_path, wikitext_file, tokenizer_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = params.resolve(tiny_params(tmp_path, dataset=str(wikitext_file), tokenizer=str(tokenizer_dir),
                                     report_to="tensorboard", max_steps=8))
    run_tiny(cfg)
    events = EventAccumulator(str(cfg.output_dir / "runs"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/grad_norm", "train/learning_rate", "eval/loss", "eval/perplexity",
            "train/tokens_per_second", "memory/peak_rss_gb"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 9))
    assert [e.step for e in events.Scalars("eval/loss")] == [4, 8]


def test_missing_tensorboard_is_a_message_and_the_run_goes_on(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with caplog.at_level(logging.WARNING):
        reporter = report.open_reporter("tensorboard", tmp_path, {})
    assert type(reporter) is report.Reporter
    assert "TensorBoard is not installed (pip install tensorboard); training continues" in caplog.text


def test_wandb_missing_or_logged_out_is_a_message(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with caplog.at_level(logging.WARNING):
        assert type(report.open_reporter("wandb", tmp_path, {})) is report.Reporter
    assert "wandb is not installed (pip install wandb)" in caplog.text

    logged_out = types.SimpleNamespace(api=types.SimpleNamespace(api_key=None))
    monkeypatch.setitem(sys.modules, "wandb", logged_out)
    with caplog.at_level(logging.WARNING):
        assert type(report.open_reporter("wandb", tmp_path, {})) is report.Reporter
    assert "report_to='wandb': not logged in" in caplog.text


def test_wandb_logged_in_gets_the_scalars(tmp_path, monkeypatch):
    logged = []
    run = types.SimpleNamespace(log=lambda values, step: logged.append((step, values)), finish=lambda: None)
    fake = types.SimpleNamespace(api=types.SimpleNamespace(api_key="key"), init=lambda **kwargs: run)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    reporter = report.open_reporter("wandb", tmp_path, {"preset": "smoke"})
    reporter.scalars({"train/loss": 2.5}, 3)
    reporter.close()
    assert logged == [(3, {"train/loss": 2.5})]
