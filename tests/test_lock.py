"""One run per output_dir: a second run is refused naming the first; a killed run frees the folder."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import papermill
import pytest
from test_notebook import NOTEBOOK, execute

from nblib.setup import lock
from nblib.training import checkpoint

pytestmark = pytest.mark.slow  # notebooks, worker processes or commands: minutes in all


REPO = Path(__file__).resolve().parent.parent
HOLD_FOREVER = ("import signal, sys; from nblib.setup import lock; lock.hold(sys.argv[1]); print('held', flush=True); "
                "signal.pause()")


def wait_for(condition, seconds: float = 120):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_holding_twice_in_one_process_is_fine_and_release_frees_it(tmp_path):
    assert lock.hold(tmp_path / "a") is True and lock.hold(tmp_path / "a") is False  # taken once
    assert lock.holds(tmp_path / "a")
    lock.hold(tmp_path / "b")  # one run per process: the previous folder is given back
    assert not lock.holds(tmp_path / "a") and lock.holds(tmp_path / "b")
    lock.release(tmp_path / "b")
    assert not lock.holds(tmp_path / "b") and not (tmp_path / "b" / lock.HOLDER_FILE).exists()


def test_another_process_is_named_and_its_kill_frees_the_folder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_FOREVER, str(tmp_path)], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(lock.RunDirectoryBusy, match=rf"in use by another run: process {holder.pid} on "
                                                        r".+, started 20\d\d-.*choose another output_dir"):
            lock.hold(tmp_path)
    finally:
        holder.kill()  # SIGKILL: no clean-up runs, the OS drops the lock
        holder.wait()
    lock.hold(tmp_path)
    assert json.loads((tmp_path / lock.HOLDER_FILE).read_text())["pid"] == os.getpid()
    lock.release(tmp_path)


def test_two_runs_started_together_and_a_killed_run_resumed(tmp_path):
    """The first run trains on; the second stops in its setup cell naming it, touching nothing.
    After the first is killed (papermill and the kernel's group, as a machine dies), a new run
    takes the folder over and continues the first run's checkpoints."""
    run = tmp_path / "run"
    parameters = ["-p", "preset", "smoke", "-p", "output_dir", str(run), "-p", "save_steps", "5",
                  "-p", "eval_steps", "1000"]
    first = subprocess.Popen([sys.executable, "-m", "papermill", str(NOTEBOOK), str(tmp_path / "first.ipynb"),
                              "--cwd", str(NOTEBOOK.parent), "-p", "max_steps", "100000", *parameters],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kernel = None
    try:
        wait_for(lambda: len(checkpoint.list_checkpoints(run / "checkpoints")) > 0)
        kernel = json.loads((run / lock.HOLDER_FILE).read_text())["pid"]
        with pytest.raises(papermill.PapermillExecutionError) as error:
            execute(tmp_path, preset="smoke", output_dir=str(run), max_steps=10)
        assert f"is in use by another run: process {kernel} on" in str(error.value)
        assert str(error.value).count("RunDirectoryBusy") == 1 and "Traceback" not in str(error.value)
        assert first.poll() is None
        newest = checkpoint.list_checkpoints(run / "checkpoints")[-1][0]
        wait_for(lambda: checkpoint.list_checkpoints(run / "checkpoints")[-1][0] > newest)  # undisturbed
    finally:
        if kernel:
            os.killpg(os.getpgid(kernel), signal.SIGKILL)  # the kernel and its children
        first.kill()
        first.wait()
    wait_for(lambda: not Path(f"/proc/{kernel}").exists() or "Z" in Path(f"/proc/{kernel}/stat").read_text().split()[2])

    stopped_at = checkpoint.list_checkpoints(run / "checkpoints")[-1][0]
    nb = execute(tmp_path, preset="smoke", output_dir=str(run), save_steps=5, eval_steps=1000,
                 max_steps=stopped_at + 5)
    assert "max_steps 100000 -> " in "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert checkpoint.list_checkpoints(run / "checkpoints")[-1][0] == stopped_at + 5
    assert not (run / lock.HOLDER_FILE).exists()  # released by the summary cell
