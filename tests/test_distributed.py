"""Data-parallel training with 2 gloo processes on the CPU: through the notebook, across
interrupts and across world sizes."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import needs, tiny_params
from test_notebook import execute, outputs_text

from nblib.setup import params
from nblib.training import checkpoint, collectives, launch

pytestmark = pytest.mark.slow  # notebooks, worker processes or commands: minutes in all


REPO = Path(__file__).resolve().parent.parent


def final_state(run_dir: Path) -> dict:
    return checkpoint.load(checkpoint.list_checkpoints(run_dir / "checkpoints")[-1][1])


def assert_same_losses(a: list[float], b: list[float]) -> None:
    assert len(a) == len(b)
    assert a == pytest.approx(b, rel=1e-4)  # summation order differs: shards vs micro-batches


def test_notebook_with_two_processes_matches_one_process_with_the_same_global_batch(tmp_path):
    # The same parameters on 1 and 2 processes (no dropout: each rank draws masks of its own).
    common = dict(preset="smoke", max_steps=12, eval_steps=4, save_steps=1,  # in-sync check every step
                  batch_size=4, gradient_accumulation_steps=2, dropout=0.0)
    for name in ("two", "one"):
        (tmp_path / name).mkdir()
    two = execute(tmp_path / "two", output_dir=str(tmp_path / "two" / "run"), devices=2, **common)
    execute(tmp_path / "one", output_dir=str(tmp_path / "one" / "run"), devices=1, **common)

    assert ("data-parallel over 2 CPU processes (gloo): global batch 4 x 2 = 8 blocks = 512 tokens per "
            "optimizer step, each CPU process taking 4 x 1") in outputs_text(two)
    assert "step 12/12: train loss" in outputs_text(two)  # rank 0's log lines reach the notebook
    for name in ("two", "one"):
        run = tmp_path / name / "run"
        assert (run / "final_model" / "model.safetensors").is_file()
        assert len(json.loads((run / "training_history.json").read_text())) == 3
    two_state, one_state = final_state(tmp_path / "two" / "run"), final_state(tmp_path / "one" / "run")
    assert two_state["world_size"] == 2 and two_state["global_batch"] == 8 == one_state["global_batch"]
    assert_same_losses(two_state["step_losses"], one_state["step_losses"])


def _diverging_worker(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        layer = torch.nn.Linear(2, 2)
        with torch.no_grad():
            layer.weight.fill_(1.0 + rank * 1e-6)  # rank 1 drifts by a hair
            layer.bias.zero_()
        from nblib.setup.hardware import Device
        collectives.check_in_sync(layer, 7, Device(torch.device("cpu"), "fp32", world_size=2, rank=rank))
    finally:
        dist.destroy_process_group()


def test_ranks_with_different_weights_stop_the_run_with_the_workers_traceback():
    with pytest.raises(mp.ProcessRaisedException, match=r"rank 1's weights differ from rank 0's at step 7: weight"):
        mp.start_processes(_diverging_worker, args=(launch._free_port(),), nprocs=2, start_method="spawn")


def start_job(tmp_path: Path, params: dict) -> subprocess.Popen:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "params.json").write_text(json.dumps(params))
    return subprocess.Popen([sys.executable, "-m", "nblib.job", str(tmp_path / "params.json")], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})


def run_job(tmp_path: Path, params: dict) -> str:
    proc = start_job(tmp_path, params)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    return output


def interrupt_job(tmp_path: Path, params: dict, after: str) -> str:
    """Start a job, send SIGINT once `after` shows in its log, return its whole output."""
    proc = start_job(tmp_path, params)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if after in line:
            proc.send_signal(signal.SIGINT)
            break
    output = "".join(lines) + proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, output
    return output


@pytest.fixture
def job_params(tmp_path, wikitext_file, tokenizer_dir):
    return tiny_params(tmp_path, dataset=str(wikitext_file), tokenizer=str(tokenizer_dir),
                       max_steps=60, eval_steps=5, save_steps=1000, batch_size=4,
                       resume_from_checkpoint="auto")


@pytest.mark.parametrize("first, then", [(2, 1), (1, 2)])
def test_interrupt_stops_every_rank_and_the_run_resumes_under_another_world_size(tmp_path, job_params, first, then):
    def params(devices: int, where: str) -> dict:
        # The same parameters either way: a global batch of 8 blocks, 4 x 1 per process on two.
        return {**job_params, "devices": devices, "gradient_accumulation_steps": 2,
                "output_dir": str(tmp_path / where)}

    run_job(tmp_path / "reference", params(1, "reference"))
    reference = final_state(tmp_path / "reference")

    output = interrupt_job(tmp_path / "split", params(first, "split"), after="step 10/60")
    assert "interrupted by SIGINT" in output
    emergency = checkpoint.load(tmp_path / "split" / checkpoint.EMERGENCY)
    assert 10 <= emergency["step"] < 60 and emergency["world_size"] == first

    output = run_job(tmp_path / "split", params(then, "split"))
    assert f"resuming a {first}-process run in {then}: global batch 8 kept" in output
    resumed = final_state(tmp_path / "split")
    assert resumed["step"] == 60 and resumed["world_size"] == then
    assert_same_losses(resumed["step_losses"], reference["step_losses"])


def test_a_failing_worker_raises_its_traceback_in_the_notebooks_process(tiny_config):
    from nblib import data, model
    from nblib.setup import hardware
    corpus = data.prepare(tiny_config)
    checkpoint.checkpoint_dir(tiny_config.output_dir).mkdir(parents=True)
    (checkpoint.checkpoint_path(tiny_config.output_dir, 0, 4)).write_bytes(b"")  # resume '' refuses this
    device = hardware.detect("fp32", devices=2)
    with pytest.raises(mp.ProcessRaisedException, match=r"(?s)Traceback.*already holds checkpoints"):
        launch.fit(tiny_config, device, model.build(tiny_config.model, corpus.tokenizer), corpus)


@needs("peft")
def test_lora_fine_tune_in_two_processes(tmp_path, pretrained_dir, wikitext_file):
    """The fine-tune example's shape on GPU T4 x2: DDP over a model whose base weights are frozen."""
    from nblib import data, model
    from nblib.setup import hardware
    from nblib.training import loop
    cfg = params.resolve(dict(preset="smoke", output_dir=str(tmp_path / "run"), init_from=str(pretrained_dir),
                              dataset=str(wikitext_file), max_length=32, batch_size=4,
                              gradient_accumulation_steps=1, max_steps=6, eval_steps=3, save_steps=1,
                              lora_r=4, devices=2, precision="fp32"))
    corpus = data.prepare(cfg)
    result = launch.fit(cfg, hardware.detect("fp32", cfg.devices), model.build(cfg.model, corpus.tokenizer), corpus)
    assert result.stop_reason is loop.StopReason.COMPLETED and result.state.step == 6
    saved = final_state(cfg.output_dir)
    assert saved["world_size"] == 2 and any("lora_B" in key for key in saved["model_state_dict"])


def test_the_parents_bar_starts_at_the_resumed_step_with_the_runs_total():
    import io

    from tqdm import tqdm
    bar, drawn = tqdm(total=None, file=io.StringIO()), []
    live = type("Live", (), {"update": lambda self, history: drawn.append(history)})()
    launch._handle(("start", {"total": 60, "initial": 20}), bar, live)
    assert (bar.total, bar.n) == (60, 20)
    launch._handle(("progress", {"step": 21, "total": 60, "postfix": {}}), bar, live)
    assert bar.n == 21
    launch._handle(("curves", [{"step": 20, "val_loss": 3.0}]), bar, live)  # rank 0's history, drawn here
    assert drawn == [[{"step": 20, "val_loss": 3.0}]]


def test_workers_get_the_weights_through_a_file_not_shared_memory(tiny_config, monkeypatch):
    """Tensors in mp.start_processes arguments go through /dev/shm (64 MB in Docker by default)."""
    from nblib import data, model
    from nblib.setup import hardware
    corpus = data.prepare(tiny_config)
    seen = {}

    def capture(worker, args, **kwargs):
        seen["args"] = args
        raise RuntimeError("captured")

    monkeypatch.setattr(launch.mp, "start_processes", capture)
    with pytest.raises(RuntimeError, match="captured"):
        launch.spawn(tiny_config, hardware.detect("fp32", devices=2), model.build(tiny_config.model, corpus.tokenizer),
                     corpus)
    assert not any(isinstance(a, (torch.Tensor, torch.nn.Module)) for a in seen["args"])
    assert not seen["args"][4].exists()  # the weights file is gone once the launch ends


def test_after_the_workers_the_notebooks_model_is_on_the_notebooks_device(tiny_config, moves):
    """On GPU T4 x2 the parent once moved the notebook's model to the CPU (to hand it to the
    workers) and left it there, while `device` said cuda:0: the Evaluate cell failed after a
    night of training. Here the notebook's device is `meta`, not the CPU's, so a model left on
    the CPU shows; the workers compute on the CPU."""
    from nblib import data, model
    from nblib.setup import hardware
    corpus = data.prepare(tiny_config)
    net = model.build(tiny_config.model, corpus.tokenizer)
    device = dataclasses.replace(hardware.detect("fp32", devices=2), device=torch.device("meta"))
    result = launch.fit(tiny_config, device, net, corpus)
    assert result.state.step == 12 and result.state.model is net
    assert {p.device for p in net.parameters()} == {torch.device("meta")}
    assert not [call for call in moves if call[0] is net and call[1] == "cpu"]


WORKER_STDERR = """import os, warnings
import nblib.training.loop

_run = nblib.training.loop.run

def _run_noisily(*args, **kwargs):
    warnings.warn("a library's warning in a worker")
    os.write(2, b"NCCL WARN a line written by C code\\n")
    return _run(*args, **kwargs)

nblib.training.loop.run = _run_noisily
"""


def test_what_the_workers_write_to_stderr_reaches_the_notebook(tiny_config, tmp_path, monkeypatch, capfd):
    """A kernel shows its own stderr, not its children's: warnings, NCCL's lines and a crash's
    last words are relayed by the parent, each marked with its rank."""
    from conftest import sitecustomize

    from nblib import data, model
    from nblib.setup import hardware
    corpus = data.prepare(tiny_config)
    sitecustomize(tmp_path, monkeypatch, WORKER_STDERR)
    net = model.build(tiny_config.model, corpus.tokenizer)
    launch.fit(tiny_config, hardware.detect("fp32", devices=2), net, corpus)
    err = capfd.readouterr().err
    for rank in (0, 1):
        assert f"[rank {rank}] NCCL WARN a line written by C code" in err
        assert "UserWarning: a library's warning in a worker" in err.split(f"[rank {rank}]", 1)[1]


def test_the_relay_passes_complete_lines_and_the_rest_at_the_end(tmp_path, capsys):
    path = tmp_path / "rank0.stderr"
    relay = launch.StderrRelay([path, tmp_path / "not-yet-written"])
    path.write_bytes(b"first line\nhalf a li")
    relay.relay()
    assert capsys.readouterr().err == "[rank 0] first line\n"
    with path.open("ab") as file:
        file.write(b"ne\nlast words")
    relay.relay(final=True)
    assert capsys.readouterr().err == "[rank 0] half a line\n[rank 0] last words\n"
