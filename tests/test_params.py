"""The params schema: every shipped file validates; bad input fails naming file and key."""
import re
from pathlib import Path

import pytest
import yaml

from jpcap_helpers.params import Params, ParamsError, field_docs, load_params, parse_overrides
from jpcap_helpers.session import setup

SHIPPED = sorted(p.name for p in (Path(__file__).resolve().parent.parent / "params").glob("*.yaml"))


def test_every_shipped_params_file_is_checked():
    assert {"smoke.yaml", "colab_t4.yaml", "colab_t4_ablations.yaml", "colab_t4_models.yaml", "colab_t4_qwen3.yaml",
            "h100.yaml"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_params_validate(project_root, name):
    p = load_params(project_root / "params" / name)
    assert p.run.name
    assert len(p.fingerprint()) == 12


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


def test_fingerprint_ignores_run_location_but_not_training_settings(project_root):
    base = load_params(project_root / "params" / "smoke.yaml")
    renamed = load_params(project_root / "params" / "smoke.yaml", {"run.name": "other", "run.mount_drive": True})
    changed = load_params(project_root / "params" / "smoke.yaml", {"train.lora_rank": 4})
    assert base.fingerprint() == renamed.fingerprint()
    assert base.fingerprint() != changed.fingerprint()
    assert base.fingerprint(exclude=["train.lora_rank"]) == changed.fingerprint(exclude=["train.lora_rank"])
    assert base.fingerprint(exclude=["train"]) == changed.fingerprint(exclude=["train"])


def test_with_overrides_returns_a_new_validated_params(project_root):
    base = load_params(project_root / "params" / "smoke.yaml")
    rank8 = base.with_overrides({"train.lora_rank": 8})
    assert (rank8.train.lora_rank, base.train.lora_rank) == (8, 32)
    assert rank8.run.output_dir == base.run.output_dir          # paths resolve against the same project
    assert base.with_overrides(["train.lora_rank=8"]) == rank8
    with pytest.raises(ParamsError, match=r"smoke\.yaml: train\.lora_rank: must be ≥ 1"):
        base.with_overrides({"train.lora_rank": 0})
    twice = rank8.with_overrides({"train.top_k_layers": "all"})
    assert (twice.train.lora_rank, twice.train.top_k_layers) == (8, "all")


def test_from_dict_validates_like_a_file():
    p = Params.from_dict({"train": {"lora_rank": 4}}, source="sweep run 3")
    assert p.train.lora_rank == 4 and p.train_method == "lora"
    with pytest.raises(ParamsError, match="sweep run 3: unknown key train.nope"):
        Params.from_dict({"train": {"nope": 1}}, source="sweep run 3")


def test_removed_keys_say_what_replaced_them(tmp_path):
    with pytest.raises(ParamsError, match="train.method .*model.load_in_4bit"):
        load_params(write(tmp_path, "train:\n  method: qlora\n"))
    assert load_params(write(tmp_path, "model:\n  load_in_4bit: true\n")).train_method == "qlora"


def test_parse_overrides_reads_yaml_values():
    assert parse_overrides(["train.lora_rank=8", "train.top_k_layers=all", "x.y=[1, 2]"]) == {
        "train.lora_rank": 8, "train.top_k_layers": "all", "x.y": [1, 2]}
    with pytest.raises(ParamsError, match="KEY=VALUE"):
        parse_overrides(["oops"])


def test_setup_writes_resolved_params(tmp_path, project_root):
    (tmp_path / "params").mkdir()
    src = (project_root / "params" / "smoke.yaml").read_text()
    (tmp_path / "params" / "s.yaml").write_text(src)
    p = setup(tmp_path / "params" / "s.yaml", "unit", report=False)
    saved = (tmp_path / "outputs" / "unit" / "params.yaml").read_text()
    assert f"params fingerprint: {p.fingerprint()}" in saved
    resolved = yaml.safe_load(saved)
    assert resolved["run"]["name"] == "unit"
    assert resolved["train"]["lora_rank"] == p.train.lora_rank
    # every section is filled in, defaults included
    assert set(resolved) == {"run", "data", "model", "generation", "zero_shot", "train", "evaluate", "ablation"}


def test_every_key_is_documented_once(project_root):
    doc = (project_root / "docs" / "params.md").read_text(encoding="utf-8")
    missing = [k for k in field_docs() if f"`{k}`" not in doc]
    assert not missing, f"keys not documented in docs/params.md: {missing}"


# Every range the schema promises: (override, value). Each must fail at load, naming the key, before
# any model loads (issue 16: 11 of 28 bad values used to pass silently).
BAD_VALUES = [
    ("train.max_steps", -3), ("train.max_steps", 0), ("train.lora_rank", 0), ("train.lora_rank", -8),
    ("train.lora_alpha", 0), ("train.learning_rate", 0), ("train.learning_rate", -1e-4),
    ("train.learning_rate", 5.0), ("train.weight_decay", -0.1), ("train.epochs", -1), ("train.epochs", 0),
    ("train.warmup_ratio", 2), ("train.warmup_ratio", -0.1), ("train.lora_dropout", 1.0),
    ("train.eval_every", -5), ("train.save_every", -1), ("train.eval_images", -1),
    ("train.max_grad_norm", -1.0), ("train.max_grad_norm", 0), ("train.micro_batch_size", 0),
    ("train.effective_batch_size", 0), ("train.top_k_layers", 0), ("generation.batch_size", 0),
    ("generation.max_new_tokens", 0), ("generation.num_beams", 0), ("evaluate.bootstrap_samples", -10),
    ("evaluate.bootstrap_samples", 5), ("evaluate.confidence", 1.5), ("evaluate.max_images", 0),
    ("model.max_pixels", 10), ("model.min_pixels", -1), ("data.max_caption_tokens", 0),
    ("data.train_subset", 0), ("data.toy.yj_train_overlap", 1.5), ("zero_shot.max_images", -1),
    ("ablation.lora_rank", [8, 0]), ("ablation.top_k_layers", [2, -1]), ("ablation.train_max_steps", 0),
    ("run.seed", -1), ("model.tiny.num_attention_heads", 3),
]


@pytest.mark.parametrize("key, value", BAD_VALUES, ids=[f"{k}={v}" for k, v in BAD_VALUES])
def test_every_bad_value_is_caught_naming_the_key(project_root, key, value, capsys):
    from jpcap_helpers.cli import main

    with pytest.raises(ParamsError, match=re.escape(key)):
        load_params(project_root / "params" / "smoke.yaml", {key: value})
    # the command line says it in one line, exit code 2, no traceback
    assert main(["params", str(project_root / "params" / "smoke.yaml"), "--set", f"{key}={value}"]) == 2
    err = capsys.readouterr().err
    assert key.split(".")[-1] in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_scientific_notation_is_accepted(project_root):
    p = load_params(project_root / "params" / "smoke.yaml", ["train.learning_rate=3e-4"])
    assert p.train.learning_rate == pytest.approx(3e-4)
    with pytest.raises(ParamsError, match="train.learning_rate: expected float, got str 'fast'"):
        load_params(project_root / "params" / "smoke.yaml", ["train.learning_rate=fast"])



_CUDAGRAPHS_OK = {"train.cudagraphs": True, "train.gradient_checkpointing": False, "train.group_by_grid": True}


@pytest.mark.parametrize("change, needs", [
    ({"model.compile": False}, "needs model.compile: true"),
    ({"train.gradient_checkpointing": True}, "train.gradient_checkpointing: set it false"),
    ({"train.group_by_grid": False}, "needs train.group_by_grid: true"),
])
def test_cudagraphs_names_each_setting_it_needs(project_root, change, needs):
    """train.cudagraphs is refused, before any model loads, with each setting it cannot run with."""
    smoke = project_root / "params" / "smoke.yaml"
    assert load_params(smoke, _CUDAGRAPHS_OK).train.cudagraphs is True
    # validation during training runs the compiled blocks eagerly (train/validation.py): allowed
    assert load_params(smoke, {**_CUDAGRAPHS_OK, "train.eval_every": 5, "train.eval_images": 5}).train.cudagraphs
    with pytest.raises(ParamsError, match=rf"train\.cudagraphs: .*{re.escape(needs)}.*set train\.cudagraphs: false"):
        load_params(smoke, {**_CUDAGRAPHS_OK, **change})
