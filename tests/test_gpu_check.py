"""bench/gpu_check.py end to end on the CPU (--cpu-smoke): the script a GPU session runs must not
be the thing that fails there."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECKS = ("peak", "t4_shape", "fp16", "oom", "resume", "compile", "two_ranks")


@pytest.mark.slow
def test_gpu_check_runs_every_check_on_a_cpu_and_ends_with_one_summary():
    cpu_only = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}  # a GPU machine's too
    done = subprocess.run([sys.executable, "bench/gpu_check.py", "--cpu-smoke"], cwd=ROOT, env=cpu_only,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    assert set(CHECKS) <= set(summary), lines[-1]
    for name in CHECKS:
        assert "error" not in summary[name], (name, summary[name])
        assert summary[name]["wall_seconds"] >= 0
        assert json.loads(next(line for line in lines if f'"check": "{name}"' in line))["check"] == name
    assert summary["oom"]["skipped"] == "needs CUDA"  # the one check that needs a GPU
    assert summary["resume"]["bitwise"] and summary["resume"]["resumed_from"] == "checkpoint_epoch0_step6.pt"
    fp16 = summary["fp16"]
    assert fp16["precision"] == "fp16" and fp16["grad_scaler"] and fp16["chunked_loss"] and fp16["loss_scale"] > 0
    assert fp16["finite_losses"] + fp16["skipped_steps"] == fp16["steps"] == 6
    assert all(value > 0 for value in summary["peak"]["measured_tflops"].values())
    assert summary["t4_shape"]["tokens_per_second"] > 0
    assert summary["two_ranks"]["global_batch"] == [16, 16]
