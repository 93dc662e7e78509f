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


def _rank_leaving(rank: int, port: int, scratch: str) -> None:
    """One of two torchrun-like processes: rank 0 finishes its later cells (a file) after a pause;
    rank 1 notes whether that file was there when it was let go."""
    import os
    import time
    from pathlib import Path

    from nblib.training import launch

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    launch.join_torchrun("fp32")
    if rank == 0:
        time.sleep(2)  # the test split, the export ...
        (Path(scratch) / "exported").touch()
    launch.leave_torchrun(trained=True)
    if rank == 1:
        (Path(scratch) / "rank 1 saw").write_text(str((Path(scratch) / "exported").exists()))


def test_the_other_ranks_leave_only_after_rank_0s_later_cells(tmp_path):
    import torch.multiprocessing as mp

    from nblib.training import launch

    mp.start_processes(_rank_leaving, args=(launch._free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    assert (tmp_path / "rank 1 saw").read_text() == "True"
