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
    "evaluate.bootstrap_samples=100", "model.tiny.pretrain_steps=8", "model.tiny.pretrain_images=16",
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


def test_bad_colab_settings_fail_at_setup_before_any_work(tmp_path, project_root, monkeypatch, capsys):
    """A persist_dir that is not writable, a Drive that does not mount, bf16 asked on a T4: one clear
    error from the setup cell, nothing written."""
    import sys
    import types

    import torch

    from jpcap_helpers.colab import ColabError
    from jpcap_helpers.models import ModelError
    from jpcap_helpers.params import ParamsError
    from jpcap_helpers.session import setup

    smoke = project_root / "params" / "smoke.yaml"
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ParamsError, match=r"run\.persist_dir: .*not a writable folder"):
        setup(smoke, overrides={"run.persist_dir": str(blocker / "drive")}, report=False)

    def refuse(mount_point):
        raise RuntimeError("mount failed: credential propagation was unsuccessful")

    colab_pkg = types.ModuleType("google.colab")
    colab_pkg.drive = types.SimpleNamespace(mount=refuse)
    monkeypatch.setitem(sys.modules, "google", types.ModuleType("google"))
    monkeypatch.setitem(sys.modules, "google.colab", colab_pkg)
    with pytest.raises(ColabError, match="Google Drive did not mount.*credential propagation"):
        setup(smoke, overrides={"run.mount_drive": True, "run.persist_dir": str(tmp_path / "d")}, report=False)
    monkeypatch.delitem(sys.modules, "google.colab")

    # a T4: compute capability 7.5, and torch saying bf16 is "supported" (emulated)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr("jpcap_helpers.colab.gpu_info", lambda: {"gpu": "Tesla T4", "memory_gib": 15.0,
                                                               "compute_capability": "7.5", "count": 1})
    with pytest.raises(ModelError, match="model.precision"):
        setup(smoke, overrides={"model.precision": "bf16", "run.output_dir": str(tmp_path / "o")})
    capsys.readouterr()
    setup(smoke, overrides={"run.output_dir": str(tmp_path / "o")})     # auto on a T4
    out = capsys.readouterr().out
    assert "compute capability 7.5, native bf16 no" in out and "precision: float16" in out
    assert not (tmp_path / "d").exists()
