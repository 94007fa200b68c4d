"""Sharing an adapter: the staged folder holds the adapter files and a model card built from the run
folder (base, data, params, metrics with CIs, contamination, flags, licences); push uploads exactly that."""
import json

import pytest

from jpcap_helpers.cli import main
from jpcap_helpers.params import load_params, save_resolved
from jpcap_helpers.publish import card_data_of, push, stage


@pytest.fixture
def run_dir(tmp_path, project_root):
    p = load_params(project_root / "params" / "smoke.yaml",
                    {"run.output_dir": str(tmp_path / "outputs"), "model.name": "qwen2-vl-2b-instruct",
                     "model.load_in_4bit": True, "data.source": "stair", "data.train_subset": 4000})
    save_resolved(p)
    adapter = p.run_dir / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 32}))
    (adapter / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    (p.run_dir / "train_result.json").write_text(json.dumps({"steps": 1250, "seconds": 7000.0,
                                                             "final_train_loss": 1.23, "non_finite_steps_skipped": 2}))
    (p.run_dir / "metrics.csv").write_text(
        "date,split,system,model_id,n_images,BLEU-4,BLEU-4_lo,BLEU-4_hi,ROUGE-L,ROUGE-L_lo,ROUGE-L_hi,CIDEr,CIDEr_lo,CIDEr_hi,trained_on_stair\n"
        "d1,test,qwen2-vl-2b-instruct,q,1000,0.10,0.09,0.11,0.40,0.39,0.41,0.50,0.45,0.55,unknown\n"
        "d2,test,qwen2-vl-2b-instruct+ft,q,1000,0.20,0.19,0.21,0.50,0.49,0.51,0.90,0.85,0.95,yes\n"
        "d3,yj_test,qwen2-vl-2b-instruct+ft,q,1000,0.12,0.11,0.13,0.42,0.41,0.43,0.60,0.55,0.65,yes\n")
    (p.run_dir / "reports").mkdir()
    (p.run_dir / "reports" / "flag_rates.csv").write_text("system,non_japanese,gendered_term\nqwen2-vl-2b-instruct+ft,0.01,0.05\n")
    return p.run_dir


def test_staged_folder_has_adapter_and_an_honest_card(run_dir, tmp_path):
    out = stage(run_dir / "adapter", "student/jpcap-test", tmp_path / "upload")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    readme = (out / "README.md").read_text()
    meta = card_data_of(readme)
    assert meta["base_model"] == "Qwen/Qwen2-VL-2B-Instruct" and meta["library_name"] == "peft"
    assert meta["language"] == ["ja"] and "qlora" in meta["tags"]
    assert "| qwen2-vl-2b-instruct+ft | test | 1000 | 0.200 [0.190, 0.210] | 0.500 [0.490, 0.510] | 0.900 [0.850, 0.950] | yes |" in readme
    assert "QLoRA" in readme and "1250 optimizer steps" in readme and "rank 32" in readme
    assert "not zero-shot on STAIR" in readme and "CC BY 4.0" in readme and "Apache-2.0" in readme
    assert "5.0%" in readme            # the gendered-term flag rate
    assert "Toy data" not in readme


def test_cli_to_folder_and_clear_errors(run_dir, tmp_path, capsys):
    assert main(["push", "--adapter", str(run_dir / "adapter"), "--repo-id", "s/x", "--to-folder",
                 str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "README.md").exists()
    assert main(["push", "--adapter", str(tmp_path), "--repo-id", "s/x", "--to-folder", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "no adapter_config.json" in err and "Traceback" not in err


def test_push_uploads_the_staged_folder(run_dir, monkeypatch):
    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **kw):
            calls["create"] = (repo_id, kw["private"])

        def upload_folder(self, folder_path, repo_id, **kw):
            from pathlib import Path
            calls["files"] = sorted(p.name for p in Path(folder_path).iterdir())

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    assert push(run_dir / "adapter", "student/jpcap-test") == "https://huggingface.co/student/jpcap-test"
    assert calls == {"create": ("student/jpcap-test", True),
                     "files": ["README.md", "adapter_config.json", "adapter_model.safetensors"]}
