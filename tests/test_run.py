"""The notebook in a live kernel, as a browser shows it: each cell's messages (stdout, stderr, error
outputs) while a person presses the interrupt button, asks for a dry run, or is refused."""
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
from nbclient import NotebookClient
from papermill.iorw import load_notebook_node
from papermill.parameterize import parameterize_notebook

pytestmark = pytest.mark.slow  # notebooks, worker processes or commands: minutes in all


NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "text_generation_kaggle_production.ipynb"
INFO_LINES = re.compile(r"^(disk: |session clock|step \d+/\d+: |resum|exported |a new run|continuing the run|"
                        r"training a byte-level|trained a byte-level|dataset |held out |reusing )", re.M)
ABSURD = re.compile(r"\binf\b|nan|\d{10,}")  # an infinite loss, or a perplexity of 5e21


def live(tmp_path, on_train=None, **parameters):
    """Run All in a live kernel, cell by cell, stopping at the first error as Jupyter does;
    `on_train(client)` runs in a thread while the train cell executes."""
    nb = parameterize_notebook(load_notebook_node(str(NOTEBOOK)), parameters)
    client = NotebookClient(nb, kernel_name="python3", allow_errors=True,
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    with client.setup_kernel():
        for index, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            if on_train and "run.train(" in cell.source:
                threading.Thread(target=on_train, args=(client,), daemon=True).start()
            client.execute_cell(cell, index)
            if errors(cell):
                break
    return [c for c in nb.cells if c.cell_type == "code"]


def errors(cell) -> list:
    return [o for o in cell.outputs if o.output_type == "error"]


def stream(cells, name: str) -> str:
    return "".join(o.text for c in cells for o in c.outputs if o.output_type == "stream" and o.name == name)


def cell_text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs)


def of(cells, marker: str):
    return next(c for c in cells if marker in c.source)


def interrupt_once(run_dir: Path, pattern: str):
    """Kernel -> Interrupt as soon as training has written a file matching `pattern` in `run_dir`."""
    def press(client):
        deadline = time.time() + 300
        while not any(run_dir.glob(pattern)) and time.time() < deadline:
            time.sleep(0.2)
        interrupt(client)
    return press


def interrupt(client) -> None:
    """Kernel -> Interrupt: what Jupyter does for a kernel whose interrupt mode is "signal"."""
    os.kill(client.km.provisioner.process.pid, signal.SIGINT)


def test_the_interrupt_button_ends_quietly_and_the_summary_says_where(tmp_path):
    run = tmp_path / "run"
    cells = live(tmp_path, on_train=interrupt_once(run, "training_history.json"), preset="smoke",
                 output_dir=str(run), max_steps=100_000, save_steps=100_000)
    assert not [c.source for c in cells if errors(c)]  # a normal stop, not a red box
    train = cell_text(of(cells, "run.train("))
    assert re.search(r"interrupted by SIGINT at step \d+ of 100,000: saved .*emergency_checkpoint\.pt", train)
    assert re.search(r"this session: steps 1 to \d+ \(\d+ steps, [\d,]+ tokens\) in \d+ s", train)
    assert "the run: best validation loss" in train and not ABSURD.search(train.split("peak memory")[0])
    assert cell_text(of(cells, "run.evaluate(")).startswith("skipped: the run stopped in the Train cell (interrupted")
    assert "the run stopped in the Train cell: interrupted by SIGINT" in cell_text(of(cells, "run.summary("))
    assert not INFO_LINES.search(stream(cells, "stderr"))  # information is not shown as an error
    assert (run / "emergency_checkpoint.pt").is_file() and not (run / "final_model").exists()


def test_an_interrupt_before_the_first_evaluation_shows_no_loss_it_did_not_measure(tmp_path):
    run = tmp_path / "run"  # pressed once step 5's checkpoint is saved; the first evaluation is at step 1,000
    cells = live(tmp_path, on_train=interrupt_once(run, "checkpoints/*_step5.pt"), preset="smoke",
                 output_dir=str(run), max_steps=100_000, eval_steps=1000, save_steps=5)
    train = cell_text(of(cells, "run.train("))
    assert "interrupted by SIGINT" in train and "no evaluation yet" in train
    assert not ABSURD.search(train.split("peak memory")[0]) and not [c for c in cells if errors(c)]


def test_a_dry_run_ends_quietly_and_trains_nothing(tmp_path):
    cells = live(tmp_path, preset="smoke", output_dir=str(tmp_path / "run"), dry_run=True)
    assert not [c.source for c in cells if errors(c)]
    setup = cell_text(of(cells, "nblib.run.start("))
    assert setup.count("preset smoke, output_dir") == 1 and "started_at" not in setup  # the config once
    assert "dry run: dry_run=True shows the configuration and trains nothing" in setup
    assert cell_text(of(cells, "run.data(")).startswith("skipped: the run stopped in the Setup cell (dry_run=True)")
    assert "the run stopped in the Setup cell" in cell_text(of(cells, "run.summary("))
    assert not (tmp_path / "run" / "data_cache").exists()


def test_a_refusal_shows_its_message_in_a_few_lines_and_ends_run_all_at_the_bottom(tmp_path):
    """Another run's checkpoint (n_layer changed): the message and its fix, not nblib's frames; in
    the setup cell, and again in the summary, where Jupyter leaves the view after Run All."""
    run = str(tmp_path / "run")
    live(tmp_path, preset="smoke", output_dir=run, max_steps=10)
    cells = live(tmp_path, preset="smoke", output_dir=run, max_steps=10, n_layer=3)
    setup = of(cells, "nblib.run.start(")
    assert not errors(setup) and "RunMismatch: " in stream([setup], "stderr")
    assert "n_layer: checkpoint 2, this run 3" in stream([setup], "stderr")
    assert cell_text(of(cells, "run.data(")).startswith("skipped: the run stopped in the Setup cell (refused")
    error, = errors(of(cells, "run.summary("))
    shown = "\n".join(error.traceback)
    assert len(shown.splitlines()) <= 15, shown
    assert error.ename == "RunMismatch" and "n_layer: checkpoint 2, this run 3" in shown
    assert "To continue it, set these back" in shown and "File " not in shown
    assert [c for c in cells if errors(c)] == [of(cells, "run.summary(")]


def test_the_gpu_preset_on_a_cpu_is_refused_in_a_few_lines_before_any_folder_is_made(tmp_path):
    cells = live(tmp_path, output_dir=str(tmp_path / "run"))
    error, = errors(of(cells, "run.summary("))
    shown = "\n".join(error.traceback)
    assert len(shown.splitlines()) <= 15 and "Settings -> Accelerator -> GPU T4 x2" in shown
    assert "File " not in shown and not (tmp_path / "run").exists()
