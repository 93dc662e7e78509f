"""Fault tests with real processes and real files: SIGKILL at random instants, SIGINT, SIGTERM."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_params

from nblib import files
from nblib.training import checkpoint

pytestmark = pytest.mark.slow  # notebooks, worker processes or commands: minutes in all


REPO = Path(__file__).resolve().parent.parent
# The driver logs each finished optimizer step and slows every fsync, so that random kills
# often land in the middle of a save.
DRIVER = """
import json, sys, time
from nblib import files, job
from nblib.training import loop

steps_log = open(sys.argv[2], "a", buffering=1)
step = loop.optimizer_step
def logged(state, *a, **k):
    out = step(state, *a, **k)
    steps_log.write(f"{state.step + 1}\\n")
    return out
loop.optimizer_step = logged
fsync = files._fsync
files._fsync = lambda path: (time.sleep(float(sys.argv[3])), fsync(path))
job.main([sys.argv[1]])
"""


def start(tmp_path, params, slow_fsync=0.0):
    (tmp_path / "params.json").write_text(json.dumps(params))
    (tmp_path / "driver.py").write_text(DRIVER)
    return subprocess.Popen(
        [sys.executable, str(tmp_path / "driver.py"), str(tmp_path / "params.json"),
         str(tmp_path / "steps.log"), str(slow_fsync)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        # One intra-op thread: with two, PyTorch's CPU kernels differ by an ulp between processes
        # in about half of these runs, even at the first step with no resume involved (measured).
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})


def logged_steps(tmp_path):
    path = tmp_path / "steps.log"
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def wait_for(condition, timeout=120):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def final_state(run_dir):
    newest = checkpoint.list_checkpoints(run_dir / "checkpoints")[-1][1]
    return checkpoint.load(newest)


@pytest.fixture(scope="module")
def shared(tmp_path_factory, wikitext_file, tokenizer_dir):
    return tiny_params(tmp_path_factory.mktemp("job"), dataset=str(wikitext_file), tokenizer=str(tokenizer_dir),
                       dropout=0.1, max_steps=150, save_steps=5, eval_steps=10, max_checkpoints=2,
                       resume_from_checkpoint="auto")


@pytest.fixture
def params(tmp_path, shared):
    return {**shared, "output_dir": str(tmp_path / "run")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shared):
    """The same run, uninterrupted: once for the module's tests."""
    where = tmp_path_factory.mktemp("reference")
    proc = start(where, {**shared, "output_dir": str(where / "run")})
    assert proc.wait(timeout=300) == 0, proc.stdout.read()
    return final_state(where / "run")


def test_sigkill_at_random_instants_loses_at_most_save_steps_and_resumes_exactly(tmp_path, params, reference):
    rng = random.Random(1234)
    run_dir = Path(params["output_dir"])
    kills, mid_save, lost = 0, 0, []
    while True:
        before = len(logged_steps(tmp_path))
        proc = start(tmp_path, params, slow_fsync=0.1)
        wait_for(lambda before=before, proc=proc: len(logged_steps(tmp_path)) > before or proc.poll() is not None)
        time.sleep(rng.uniform(0.0, 1.5))  # a random instant of training, saves included
        if proc.poll() is not None:
            break
        proc.kill()
        proc.wait()
        kills += 1
        mid_save += any(files.TEMP_MARK in p.name for p in run_dir.rglob(".*"))
        done = max(logged_steps(tmp_path), default=0)
        survivors = checkpoint.list_checkpoints(run_dir / "checkpoints")
        if survivors:
            checkpoint.load(survivors[-1][1])  # the newest checkpoint is always whole
        lost.append(done - max([s for s, _ in survivors], default=0))
        assert kills < 40, "never finished"
    assert proc.wait() == 0, proc.stdout.read()
    print(f"{kills} kills, {mid_save} during a save, steps lost per kill: {lost}")
    assert kills >= 3 and mid_save >= 1
    assert max(lost) <= params["save_steps"]
    result = final_state(run_dir)
    assert result["step"] == reference["step"] == 150
    assert result["step_losses"] == reference["step_losses"]
    for name, tensor in reference["model_state_dict"].items():
        assert torch.equal(result["model_state_dict"][name], tensor), name
    assert [r["step"] for r in result["history"]] == list(range(10, 151, 10))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_sigint_and_sigterm_save_an_emergency_checkpoint_and_exit_cleanly(tmp_path, params, reference, signum):
    proc = start(tmp_path, params, slow_fsync=0.02)
    wait_for(lambda: len(logged_steps(tmp_path)) >= 12)
    proc.send_signal(signum)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    assert f"interrupted by {signal.Signals(signum).name}" in output
    assert "run again to continue (resume_from_checkpoint='auto')" in output
    emergency = checkpoint.load(Path(params["output_dir"]) / checkpoint.EMERGENCY)
    assert emergency["step"] == max(logged_steps(tmp_path)) < 150  # no step lost, none half-done

    proc = start(tmp_path, params)
    assert proc.wait(timeout=300) == 0
    result = final_state(Path(params["output_dir"]))
    assert result["step_losses"] == reference["step_losses"]
    assert not (Path(params["output_dir"]) / checkpoint.EMERGENCY).exists()  # superseded
