"""The Colab reality, offline: each notebook gets a fresh runtime, so whatever a later notebook needs must
come from the persistent folder (``run.persist_dir``, a Drive folder on Colab) alone."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from jpcap_helpers.params import load_params

SHRUNK = [
    "data.toy.n_train=96", "data.toy.n_val=48", "data.toy.n_yj=24", "data.val_size=16", "data.test_size=32",
    "train.max_steps=12", "train.eval_every=12", "train.eval_images=8", "train.save_every=12",
    "evaluate.bootstrap_samples=100",
]


def _project(tmp_path, project_root):
    """A project folder of our own (params only), so that anything written outside persist_dir shows."""
    proj = tmp_path / "project"
    (proj / "params").mkdir(parents=True)
    shutil.copy(project_root / "params" / "smoke.yaml", proj / "params" / "smoke.yaml")
    return proj / "params" / "smoke.yaml"


def _jpcap_run(params_file, only, persist, cwd):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HOME", "JPCAP_RUN_LOCKS")}
    sets = [a for s in [f"run.persist_dir={persist}", *SHRUNK] for a in ("--set", s)]
    return subprocess.run([sys.executable, "-m", "jpcap_helpers.cli", "run", "--params", str(params_file),
                           "--run-name", "colab", "--only", only, *sets], cwd=cwd, env=env,
                          capture_output=True, text=True)


def test_persist_dir_holds_every_path(tmp_path, project_root):
    p = load_params(project_root / "params" / "smoke.yaml", {"run.persist_dir": str(tmp_path / "drive")})
    for path in (p.run_dir, p.processed_dir, p.images_dir, p.model.models_dir):
        assert str(path).startswith(str(tmp_path / "drive")), path


@pytest.mark.slow
def test_notebooks_run_in_fresh_runtimes_from_the_persistent_folder(tmp_path, project_root):
    params_file = _project(tmp_path, project_root)
    persist = tmp_path / "drive"
    first = _jpcap_run(params_file, "01", persist, tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    # nothing outside the persistent folder: the project folder still holds only its params
    assert sorted(p.name for p in params_file.parent.parent.iterdir()) == ["params"]
    # a fresh runtime: a new process, no cache, nothing local; 02-04 from the persistent folder alone
    later = _jpcap_run(params_file, "02,03,04", persist, tmp_path)
    assert later.returncode == 0, later.stderr[-2000:]
    run = persist / "outputs" / "colab"
    assert (run / "adapter" / "adapter_config.json").exists()
    assert (run / "metrics.csv").exists()
    report = json.loads((persist / "outputs" / "data" / "jp-shapes" / "processed" / "report.json").read_text())
    assert report["splits"]["test"]["images"] == 32
    assert (persist / "outputs" / "models").is_dir()            # the tiny model was built there
    assert sorted(p.name for p in params_file.parent.parent.iterdir()) == ["params"]
