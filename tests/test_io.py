"""One writer per run folder (io.run_lock): re-entrant for the holder and its children, a clear refusal
for anyone else, and a lock left by a killed process taken over."""
import os
import signal
import subprocess
import sys

import pytest

from jpcap_helpers.io import LOCK_ENV, RunLockedError, run_lock

HOLD = """
import sys, time
from jpcap_helpers.io import run_lock
with run_lock(sys.argv[1], "train"):
    print("holding", flush=True)
    time.sleep(60)
"""

TRY = """
import sys
from jpcap_helpers.io import run_lock
with run_lock(sys.argv[1], "caption"):
    print("got it")
"""


def _env_without_inherited_locks():
    return {k: v for k, v in os.environ.items() if k != LOCK_ENV}


def _start_holder(run_dir):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True,
                            env=_env_without_inherited_locks())
    assert proc.stdout.readline().strip() == "holding"
    return proc


def test_second_process_is_refused_naming_the_holder(tmp_path):
    holder = _start_holder(tmp_path / "run")
    try:
        other = subprocess.run([sys.executable, "-c", TRY, str(tmp_path / "run")], capture_output=True,
                               text=True, env=_env_without_inherited_locks())
        assert other.returncode != 0 and "got it" not in other.stdout
        assert f"in use by PID {holder.pid}" in other.stderr and "(train:" in other.stderr
    finally:
        holder.kill()
        holder.wait()


def test_lock_of_a_killed_process_is_taken_over(tmp_path):
    holder = _start_holder(tmp_path / "run")
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    other = subprocess.run([sys.executable, "-c", TRY, str(tmp_path / "run")], capture_output=True, text=True,
                           env=_env_without_inherited_locks())
    assert other.returncode == 0 and "got it" in other.stdout
    assert f"took over the lock of PID {holder.pid}" in other.stderr


def test_reentrant_in_process_and_for_children(tmp_path):
    with run_lock(tmp_path, "jpcap run"):
        with run_lock(tmp_path, "train"):       # the same process again (a notebook calling train)
            pass
        child = subprocess.run([sys.executable, "-c", TRY, str(tmp_path)], capture_output=True, text=True)
        assert child.returncode == 0, child.stderr     # a papermill kernel started under jpcap run
    assert not (tmp_path / ".jpcap.lock.json").exists()


def test_released_after_an_exception(tmp_path):
    with pytest.raises(KeyError):
        with run_lock(tmp_path, "train"):
            raise KeyError("boom")
    with run_lock(tmp_path, "train"):
        pass


def test_an_unwritable_run_folder_is_an_os_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError):
        with run_lock(blocker / "run", "train"):
            pass
    assert issubclass(RunLockedError, OSError)


def test_every_long_writer_takes_the_lock(tmp_path, project_root):
    """Training, both captioning runs, sweeps and `jpcap run` refuse a run folder another process holds,
    before they load a model or write a file (two `jpcap train` 3 s apart used to corrupt each other)."""
    from jpcap_helpers import engine, train
    from jpcap_helpers.params import load_params
    from jpcap_helpers.runner import run_notebooks

    p = load_params(project_root / "params" / "smoke.yaml", {"run.output_dir": str(tmp_path / "outputs")})
    holder = _start_holder(p.run_dir)
    try:
        before = sorted(p.run_dir.iterdir())
        for attempt in (lambda: train.train(p), lambda: engine.run_zero_shot(p),
                        lambda: engine.run_finetuned(p, adapter=tmp_path / "adapter"),
                        lambda: run_notebooks(project_root / "params" / "smoke.yaml", only="01",
                                              overrides={"run.output_dir": str(tmp_path / "outputs")},
                                              echo=lambda *_: None)):
            with pytest.raises(RunLockedError, match=f"PID {holder.pid}"):
                attempt()
        assert sorted(p.run_dir.iterdir()) == before    # the sweep: tests/test_ablations.py
    finally:
        holder.kill()
        holder.wait()
