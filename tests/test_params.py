"""The params schema: every shipped file validates; bad input fails naming file and key."""
from pathlib import Path

import pytest
import yaml

from jpcap_helpers.params import Params, ParamsError, field_docs, load_params, start_run


@pytest.mark.parametrize("name", ["smoke.yaml", "colab_t4.yaml", "h100.yaml"])
def test_shipped_params_validate(project_root, name):
    p = load_params(project_root / "params" / name)
    assert p.run.name
    assert len(p.hash()) == 12


def write(tmp_path, body: str) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(body, encoding="utf-8")
    return path


@pytest.mark.parametrize("body, message", [
    ("train:\n  lora_rnk: 8\n", r"p\.yaml: unknown key train\.lora_rnk"),
    ("trian:\n  lora_rank: 8\n", r"p\.yaml: unknown key trian"),
    ("train:\n  lora_rank: '8'\n", r"p\.yaml: train\.lora_rank: expected int, got str"),
    ("train:\n  lora_rank: 8.5\n", r"train\.lora_rank: expected int"),
    ("train:\n  gradient_checkpointing: 1\n", r"train\.gradient_checkpointing: expected bool"),
    ("train:\n  top_k_layers: most\n", r"train\.top_k_layers: expected int \| 'all'"),
    ("model:\n  precision: int8\n", r"model\.precision: expected one of"),
    ("data:\n  toy: [1, 2]\n", r"data\.toy: expected a mapping"),
    ("data:\n  karpathy_json: missing/dataset_coco.json\n", r"data\.karpathy_json: file not found"),
    ("train:\n  micro_batch_size: 8\n  effective_batch_size: 12\n", r"train\.effective_batch_size: must be a multiple"),
    ("zero_shot:\n  models: qwen\n", r"zero_shot\.models: expected list of str"),
    ("- just\n- a list\n", r"top level must be a mapping"),
    ("train: [\n", r"not valid YAML"),
])
def test_bad_params_name_file_and_key(tmp_path, body, message):
    with pytest.raises(ParamsError, match=message):
        load_params(write(tmp_path, body))


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ParamsError, match="params file not found: .*nope.yaml"):
        load_params(tmp_path / "nope.yaml")


def test_defaults_fill_in_and_ints_accepted_for_floats(tmp_path):
    p = load_params(write(tmp_path, "train:\n  learning_rate: 1\n  top_k_layers: all\n"))
    assert p.train.learning_rate == 1.0 and isinstance(p.train.learning_rate, float)
    assert p.train.top_k_layers == "all"
    assert p.train.lora_rank == Params().train.lora_rank


def test_overrides_are_validated_too(project_root):
    p = load_params(project_root / "params" / "smoke.yaml", {"train.lora_rank": 8})
    assert p.train.lora_rank == 8
    with pytest.raises(ParamsError, match="train.lora_rank: expected int"):
        load_params(project_root / "params" / "smoke.yaml", {"train.lora_rank": "eight"})
    with pytest.raises(ParamsError, match="unknown key train.nope"):
        load_params(project_root / "params" / "smoke.yaml", {"train.nope": 1})


def test_relative_paths_resolve_against_project_folder(tmp_path):
    (tmp_path / "params").mkdir()
    path = tmp_path / "params" / "x.yaml"
    path.write_text("run:\n  output_dir: out\ndata:\n  root: d\n")
    p = load_params(path)
    assert Path(p.run.output_dir) == tmp_path / "out"
    assert p.processed_dir == tmp_path / "d" / "processed"


def test_hash_ignores_run_name_but_not_training_settings(project_root):
    base = load_params(project_root / "params" / "smoke.yaml")
    renamed = load_params(project_root / "params" / "smoke.yaml", {"run.name": "other"})
    changed = load_params(project_root / "params" / "smoke.yaml", {"train.lora_rank": 4})
    assert base.hash() == renamed.hash()
    assert base.hash() != changed.hash()


def test_start_run_writes_resolved_params(tmp_path, project_root):
    (tmp_path / "params").mkdir()
    src = (project_root / "params" / "smoke.yaml").read_text()
    (tmp_path / "params" / "s.yaml").write_text(src)
    p = start_run(tmp_path / "params" / "s.yaml", "unit")
    saved = (tmp_path / "outputs" / "unit" / "params.yaml").read_text()
    assert f"params hash: {p.hash()}" in saved
    resolved = yaml.safe_load(saved)
    assert resolved["run"]["name"] == "unit"
    assert resolved["train"]["lora_rank"] == p.train.lora_rank
    # every section is filled in, defaults included
    assert set(resolved) == {"run", "data", "model", "generation", "zero_shot", "train", "evaluate", "ablation"}


def test_every_key_is_documented_once(project_root):
    doc = (project_root / "docs" / "params.md").read_text(encoding="utf-8")
    missing = [k for k in field_docs() if f"`{k}`" not in doc]
    assert not missing, f"keys not documented in docs/params.md: {missing}"
