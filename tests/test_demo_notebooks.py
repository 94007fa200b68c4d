"""The six real notebooks run headless, in order, on smoke params shrunk for the test suite (the full
`make demo` uses params/smoke.yaml as is). Checks what each stage leaves on disk."""
import json

import pandas as pd
import pytest

from jpcap_helpers.runner import NOTEBOOKS, run_notebooks


@pytest.mark.slow
def test_all_notebooks_run_on_smoke_params(tmp_path, project_root):
    overrides = {
        "run.output_dir": str(tmp_path / "outputs"), "data.root": str(tmp_path / "data" / "jp-shapes"),
        "model.models_dir": str(tmp_path / "models"),
        "data.toy.n_train": 96, "data.toy.n_val": 48, "data.toy.n_yj": 24, "data.val_size": 16, "data.test_size": 32,
        "train.max_steps": 24, "train.eval_every": 12, "train.eval_images": 8, "train.save_every": 12,
        "ablation.train_max_steps": 6, "ablation.eval_max_images": 8, "ablation.max_runs": 2,
        "evaluate.bootstrap_samples": 100,
        # the pretrained base and QLoRA stay on (as in the demo), pretraining shrunk
        "model.tiny.pretrain_steps": 8, "model.tiny.pretrain_images": 16,
    }
    results = run_notebooks(project_root / "params" / "smoke.yaml", run_name="nbtest", overrides=overrides,
                            echo=lambda *_: None, progress_bar=False)
    assert [r.name for r in results] == NOTEBOOKS
    run = tmp_path / "outputs" / "nbtest"
    for name in NOTEBOOKS:
        assert (run / f"{name}.ipynb").exists()
    report = json.loads((tmp_path / "data" / "jp-shapes" / "processed" / "report.json").read_text())
    assert report["splits"]["test"]["images"] == 32
    metrics = pd.read_csv(run / "metrics.csv")
    systems = set(metrics["system"])
    assert {"tiny-qwen2-vl", "tiny-qwen2-vl+ft", "constant-caption"} <= systems
    assert set(metrics["split"]) == {"test", "yj_test"}
    assert (run / "adapter" / "adapter_config.json").exists()
    assert json.loads((run / "adapter" / "jpcap_train.json").read_text())["base_load_in_4bit"] is True
    stamp = json.loads((tmp_path / "models" / "tiny-qwen2-vl" / "jpcap_tiny.json").read_text())
    assert stamp["pretrain"]["steps"] == 8
    assert (run / "reports" / "failure_cases.html").stat().st_size > 1000
    assert (run / "reports" / "ablation_results.csv").exists()
