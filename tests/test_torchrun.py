"""torchrun: `python -m nblib.job` under torchrun, two gloo processes on this CPU, as one machine and
as two "nodes" meeting through a c10d rendezvous on 127.0.0.1; its checkpoints resume in the
notebook, and the notebook's under torchrun."""
import json
import socket
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import tiny_params
from test_notebook import execute, outputs_text

pytestmark = pytest.mark.slow  # notebooks, worker processes or commands: minutes in all


def torchrun(*arguments: str, cwd) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *arguments, "-m", "nblib.job", "p.yaml"],
                            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finished(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-3000:]
    return output


def write_params(tmp_path, wikitext_file, tokenizer_dir, **overrides) -> dict:
    values = tiny_params(tmp_path, dataset=str(wikitext_file), tokenizer=str(tokenizer_dir),
                         resume_from_checkpoint="auto", **overrides)
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(values))
    return values


def saved_world_size(run, step: int) -> int:
    return torch.load(next((run / "checkpoints").glob(f"*_step{step}.pt")), weights_only=False)["world_size"]


def test_torchrun_trains_and_resumes_in_the_notebook_and_back(tmp_path, wikitext_file, tokenizer_dir):
    run = tmp_path / "run"
    write_params(tmp_path, wikitext_file, tokenizer_dir, max_steps=8)
    output = finished(torchrun("--nproc_per_node=2", cwd=tmp_path))
    assert output.count("completed at step 8 of 8") == 1  # rank 0 alone reports
    assert saved_world_size(run, 8) == 2
    # ... and then runs the notebook's later cells alone, as the notebook does after its workers
    assert output.count("exported ") == 1 and output.count("the run went through every cell") == 1
    assert "test_loss" in json.loads((run / "training_history.json").read_text())[-1]
    assert (run / "final_model" / "model.safetensors").is_file() and not (run / ".nblib.lock.json").exists()

    values = write_params(tmp_path, wikitext_file, tokenizer_dir, max_steps=12)
    text = outputs_text(execute(tmp_path, **values))
    assert "continuing the run in" in text and "from step 8" in text
    assert saved_world_size(run, 12) == 1

    write_params(tmp_path, wikitext_file, tokenizer_dir, max_steps=16)
    finished(torchrun("--nproc_per_node=2", cwd=tmp_path))
    history = json.loads((run / "training_history.json").read_text())
    assert [r["step"] for r in history] == [4, 8, 12, 16] and saved_world_size(run, 16) == 2
    assert all(0 < r["mfu"] < 1 for r in history)


def test_two_nodes_meet_through_a_c10d_rendezvous(tmp_path, wikitext_file, tokenizer_dir):
    write_params(tmp_path, wikitext_file, tokenizer_dir, max_steps=8)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    node = ("--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
            "--rdzv-id=nblib-test")
    first, second = torchrun(*node, cwd=tmp_path), torchrun(*node, cwd=tmp_path)
    outputs = finished(first) + finished(second)
    assert outputs.count("completed at step 8 of 8") == 1
    assert saved_world_size(tmp_path / "run", 8) == 2



class RecordingGroup:
    """torch.distributed as `leave_torchrun` uses it, recording the calls (the real gloo path runs in
    the torchrun tests above, which end only if every rank leaves)."""

    def __init__(self):
        self.calls = []

    def is_initialized(self):
        return True

    def barrier(self, group=None):
        self.calls.append(("barrier", group))

    def destroy_process_group(self):
        self.calls.append("destroy")


@pytest.mark.parametrize("trained, calls", [(True, [("barrier", "after training"), "destroy"]), (False, ["destroy"])])
def test_after_training_every_rank_waits_for_rank_0_before_leaving(monkeypatch, trained, calls):
    from nblib.training import launch

    dist = RecordingGroup()
    monkeypatch.setattr(launch, "dist", dist)
    monkeypatch.setattr(launch, "_after_training", "after training")
    launch.leave_torchrun(trained=trained)
    assert dist.calls == calls
