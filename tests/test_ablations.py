"""Sweep expansion, the resumable sweep runner (fake notebook runner: nothing trains here) and the
comparison of finished runs on fixture metrics."""
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from jpcap_helpers.analysis import ablations
from jpcap_helpers.cli import main
from jpcap_helpers.evaluate import append_metrics_row
from jpcap_helpers.params import ParamsError, load_params
from jpcap_helpers.runner import NotebookFailed

# the sweep-mechanics tests were written around a fixed base (r32 · top 2 · trainable; axes r8 and frozen,
# 3 runs); params/smoke.yaml itself now sweeps r32 · top 4 (test_smoke_sweep_… checks it as shipped)
MECHANICS_BASE = {"train": {"top_k_layers": 2}, "ablation": {"top_k_layers": [2], "max_runs": 3}}


def write_params(tmp_path: Path, project_root: Path, ablation=None, train=None, name="base", extra=None,
                 as_shipped: bool = False) -> Path:
    raw = yaml.safe_load((project_root / "params" / "smoke.yaml").read_text(encoding="utf-8"))
    raw["run"]["name"] = name
    if not as_shipped:
        for section, values in MECHANICS_BASE.items():
            raw[section].update(values)
    if ablation is not None:
        raw["ablation"] = ablation
    if train:
        raw["train"].update(train)
    for key, value in (extra or {}).items():
        section, leaf = key.split(".")
        raw.setdefault(section, {})[leaf] = value
    (tmp_path / "params").mkdir(exist_ok=True)
    path = tmp_path / "params" / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    processed = tmp_path / "outputs" / "data" / "jp-shapes" / "processed"
    processed.mkdir(parents=True, exist_ok=True)
    for f in ("train_pairs.jsonl", "test.jsonl", "yj_test.jsonl"):
        (processed / f).touch()
    return path


SEED_DEFAULT_TRAIN = {"lora_rank": 32, "top_k_layers": 6, "projector": "trainable"}
SEED_AXES = {"mode": "one_factor", "lora_rank": [8, 16, 32, 64], "top_k_layers": [2, 6, 12, "all"],
             "projector": ["trainable", "frozen"]}


def setting(o):
    return (o["train.lora_rank"], o["train.top_k_layers"], o["train.projector"])


# ---- expansion ------------------------------------------------------------------------------

def test_smoke_sweep_expands_one_factor_around_its_own_base(tmp_path, project_root):
    p = load_params(write_params(tmp_path, project_root, as_shipped=True))   # r32 top 4 trainable; max_runs 4
    runs = ablations.expand_sweep(p)
    assert [o["run.name"] for o in runs] == [
        "base-r32-top4-proj_trainable", "base-r8-top4-proj_trainable", "base-r32-top2-proj_trainable",
        "base-r32-top4-proj_frozen"]
    first = runs[0]
    assert first["train.max_steps"] == p.ablation.train_max_steps and first["zero_shot.max_images"] == p.ablation.eval_max_images
    assert p.ablation.train_max_steps is not None and p.ablation.eval_max_images is not None
    assert first["train.eval_images"] == 40
    assert Path(first["run.output_dir"]) == (tmp_path / "outputs" / "base" / "sweep").resolve()


def test_one_factor_around_the_seed_default_includes_the_base_once(tmp_path, project_root):
    p = load_params(write_params(tmp_path, project_root, SEED_AXES, SEED_DEFAULT_TRAIN))
    runs = ablations.expand_sweep(p)
    settings = [setting(o) for o in runs]
    assert settings[0] == (32, 6, "trainable")
    assert settings.count((32, 6, "trainable")) == 1
    assert len(settings) == 1 + 3 + 3 + 1      # other ranks, other depths, frozen projector
    assert (32, "all", "trainable") in settings and "base-r32-topall-proj_trainable" in [o["run.name"] for o in runs]
    # each run varies one axis only
    for s in settings[1:]:
        assert sum(a != b for a, b in zip(s, (32, 6, "trainable"))) == 1


def test_grid_is_the_full_product_with_the_base_first(tmp_path, project_root):
    p = load_params(write_params(tmp_path, project_root, {**SEED_AXES, "mode": "grid"}, SEED_DEFAULT_TRAIN))
    settings = [setting(o) for o in ablations.expand_sweep(p)]
    assert len(settings) == 4 * 4 * 2 and len(set(settings)) == len(settings)
    assert settings[0] == (32, 6, "trainable")
    # a base outside the grid is added in front
    p = load_params(write_params(tmp_path, project_root, {**SEED_AXES, "mode": "grid", "lora_rank": [8]},
                                 SEED_DEFAULT_TRAIN))
    settings = [setting(o) for o in ablations.expand_sweep(p)]
    assert settings[0] == (32, 6, "trainable") and len(settings) == 1 + 4 * 2


def test_max_runs_caps_and_names_are_deterministic(tmp_path, project_root):
    p = load_params(write_params(tmp_path, project_root, {**SEED_AXES, "max_runs": 4}, SEED_DEFAULT_TRAIN))
    names = [o["run.name"] for o in ablations.expand_sweep(p)]
    assert names == ["base-r32-top6-proj_trainable", "base-r8-top6-proj_trainable",
                     "base-r16-top6-proj_trainable", "base-r64-top6-proj_trainable"]
    assert names == [o["run.name"] for o in ablations.expand_sweep(p)]


def test_caps_keep_a_smaller_base_value(tmp_path, project_root):
    p = load_params(write_params(tmp_path, project_root, train={"max_steps": 10},
                                 extra={"zero_shot.max_images": 12}))
    first = ablations.expand_sweep(p)[0]
    assert first["train.max_steps"] == 10 and first["zero_shot.max_images"] == 12


@pytest.mark.parametrize("axes,key", [
    ({"lora_rank": [8, 0]}, r"ablation\.lora_rank\[1\]"),
    ({"top_k_layers": [2, 0]}, r"ablation\.top_k_layers\[1\]"),
    ({"lora_rank": [8, 8]}, r"ablation\.lora_rank\[1\]: 8 is listed twice"),
    ({"projector": ["half"]}, r"ablation\.projector\[0\]"),        # caught by load_params already
    ({"top_k_layers": ["most"]}, r"ablation\.top_k_layers\[0\]"),
    ({"max_runs": 0}, r"ablation\.max_runs"),
    ({"model": ["qwen3-vl-2b-instruct", "qwen9-vl"]}, r"ablation\.model\[1\]: unknown model 'qwen9-vl'"),
    ({"model": ["llava-jp-1.3b"]}, r"ablation\.model\[0\]: 'llava-jp-1\.3b' is of family llava_jp and cannot be fine-tuned"),
    ({"model": ["asagi-2b"]}, r"ablation\.model\[0\]: 'asagi-2b' is of family asagi and cannot be fine-tuned"),
    ({"model": ["japanese-stable-vlm"]}, r"ablation\.model\[0\]: 'japanese-stable-vlm' runs in its own pinned env"),
    ({"model": ["qwen3-vl-2b-instruct", "Qwen/Qwen3-VL-2B-Instruct"]},
     r"ablation\.model\[1\]: 'Qwen/Qwen3-VL-2B-Instruct' is listed twice"),
    ({"model": ["tiny-qwen2-vl", "qwen3-vl-2b-instruct", "qwen3-vl-2b-instruct"]},
     r"ablation\.model\[2\]: 'qwen3-vl-2b-instruct' is listed twice"),
    ({"model": "qwen3-vl-2b-instruct"}, r"ablation\.model: expected list of str"),   # caught by load_params
])
def test_invalid_axis_values_are_rejected_with_the_key(tmp_path, project_root, axes, key):
    path = write_params(tmp_path, project_root, {**SEED_AXES, **axes})
    with pytest.raises(ParamsError, match=key):
        ablations.expand_sweep(load_params(path))


MODELS_ONLY = {"lora_rank": [], "top_k_layers": [], "projector": []}   # the base's r32 · top 2 · trainable


def test_model_axis_one_factor_adds_one_run_per_other_model_and_keeps_the_old_names(tmp_path, project_root):
    axes = {"lora_rank": [8], "top_k_layers": [2], "projector": ["trainable", "frozen"]}
    before = ablations.expand_sweep(load_params(write_params(tmp_path, project_root, axes)))
    p = load_params(write_params(tmp_path, project_root, {
        **axes, "model": ["qwen2-vl-2b-instruct", "tiny-qwen2-vl", "Qwen/Qwen3-VL-2B-Instruct"]}))
    runs = ablations.expand_sweep(p)
    assert [o["run.name"] for o in runs] == [
        "base-r32-top2-proj_trainable", "base-r8-top2-proj_trainable", "base-r32-top2-proj_frozen",
        "base-r32-top2-proj_trainable-qwen2-vl-2b-instruct", "base-r32-top2-proj_trainable-qwen3-vl-2b-instruct"]
    assert runs[:3] == before        # the base model's runs: same names, same overrides as without the axis
    assert [o["model.name"] for o in runs] == ["tiny-qwen2-vl"] * 3 + ["qwen2-vl-2b-instruct", "qwen3-vl-2b-instruct"]
    def recipe(o):
        return {k: v for k, v in o.items() if k not in ("run.name", "model.name")}

    assert recipe(runs[3]) == recipe(runs[4]) == recipe(runs[0])    # the same recipe: only the model differs
    table = ablations.describe_sweep(p)
    assert list(table["varied"]) == ["(base)", "lora_rank", "projector", "model", "model"]
    assert list(table["model"]) == [o["model.name"] for o in runs]
    assert ablations.swept_axes(p) == ["lora_rank", "projector", "model"]


def test_model_axis_in_a_grid(tmp_path, project_root):
    p = load_params(write_params(tmp_path, project_root, {**MODELS_ONLY, "mode": "grid", "lora_rank": [8, 32],
                                                          "model": ["tiny-qwen2-vl", "qwen3-vl-2b-instruct"]}))
    runs = ablations.expand_sweep(p)
    assert [o["run.name"] for o in runs] == [
        "base-r32-top2-proj_trainable", "base-r8-top2-proj_trainable", "base-r8-top2-proj_trainable-qwen3-vl-2b-instruct",
        "base-r32-top2-proj_trainable-qwen3-vl-2b-instruct"]
    assert list(ablations.describe_sweep(p)["varied"]) == ["(base)", "lora_rank", "lora_rank+model", "model"]
    # a base model outside the list is run in front, as for the other axes
    p = load_params(write_params(tmp_path, project_root, {**MODELS_ONLY, "mode": "grid",
                                                          "model": ["qwen2.5-vl-3b-instruct", "qwen3-vl-2b-instruct"]}))
    assert [o["model.name"] for o in ablations.expand_sweep(p)] == [
        "tiny-qwen2-vl", "qwen2.5-vl-3b-instruct", "qwen3-vl-2b-instruct"]
    assert ablations.swept_axes(p) == ["model"]


def test_a_base_written_as_a_hub_id_is_the_same_model(tmp_path, project_root):
    p = load_params(write_params(tmp_path, project_root, {**MODELS_ONLY, "model": [
        "qwen2-vl-2b-instruct", "qwen3-vl-2b-instruct"]}, extra={"model.name": "Qwen/Qwen2-VL-2B-Instruct"}))
    runs = ablations.expand_sweep(p)
    assert [(o["run.name"], o["model.name"]) for o in runs] == [
        ("base-r32-top2-proj_trainable", "Qwen/Qwen2-VL-2B-Instruct"),
        ("base-r32-top2-proj_trainable-qwen3-vl-2b-instruct", "qwen3-vl-2b-instruct")]


def test_labels_add_the_model_only_where_it_is_not_the_base_model():
    s = {"lora_rank": 8, "top_k_layers": "all", "projector": "frozen"}
    assert ablations.setting_label(s, "tiny-qwen2-vl") == "r8-topall-proj_frozen"
    assert ablations.setting_label({**s, "model": "tiny-qwen2-vl"}, "tiny-qwen2-vl") == "r8-topall-proj_frozen"
    assert ablations.setting_label({**s, "model": "qwen2.5-vl-3b-instruct"}, "tiny-qwen2-vl") == (
        "r8-topall-proj_frozen-qwen2.5-vl-3b-instruct")
    assert ablations.run_name("b", {**s, "model": "/m/My Qwen3 (ft)/"}, "tiny-qwen2-vl") == (
        "b-r8-topall-proj_frozen-my-qwen3-ft")
    assert ablations.model_slug("/m/..ü ü..") == "model"


def _local_model(folder: Path, model_type: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}), encoding="utf-8")
    return folder


def test_local_model_folders_on_the_model_axis(tmp_path, project_root, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _local_model(tmp_path / "models" / "My Qwen3 (ft)", "qwen3_vl")
    _local_model(tmp_path / "other" / "my-qwen3-ft", "qwen2_vl")
    _local_model(tmp_path / "models" / "jp", "llava-jp")
    p = load_params(write_params(tmp_path, project_root, {**MODELS_ONLY, "model": ["models/My Qwen3 (ft)"]}))
    run = ablations.expand_sweep(p)[1]
    assert run["run.name"] == "base-r32-top2-proj_trainable-my-qwen3-ft"
    assert run["model.name"] == str(tmp_path / "models" / "My Qwen3 (ft)")   # absolute: 03 runs in notebooks/
    for models, key in ((["models/My Qwen3 (ft)", "other/my-qwen3-ft"],
                         r"ablation\.model\[1\]: 'other/my-qwen3-ft' and '.*My Qwen3 \(ft\)' share the run-name part"),
                        (["models/jp"], r"ablation\.model\[0\]: 'models/jp' is of family llava_jp"),
                        (["models/none"], r"ablation\.model\[0\]: unknown model 'models/none'")):
        p = load_params(write_params(tmp_path, project_root, {**MODELS_ONLY, "model": models}))
        with pytest.raises(ParamsError, match=key):
            ablations.expand_sweep(p)


def test_the_base_model_is_checked_with_the_axis_and_left_alone_without(tmp_path, project_root):
    untrainable = {"model.name": "llava-jp-1.3b"}
    p = load_params(write_params(tmp_path, project_root, {**MODELS_ONLY, "model": ["qwen3-vl-2b-instruct"]},
                                 extra=untrainable))
    with pytest.raises(ParamsError, match=r"base\.yaml: model\.name: 'llava-jp-1\.3b' is of family llava_jp"):
        ablations.expand_sweep(p)
    # without the model axis nothing is resolved: the sweep expands as it did before the axis existed
    p = load_params(write_params(tmp_path, project_root, {**MODELS_ONLY, "lora_rank": [8]}, extra=untrainable))
    assert [o["model.name"] for o in ablations.expand_sweep(p)] == ["llava-jp-1.3b"] * 2


def test_a_pinned_revision_is_refused_with_other_models(tmp_path, project_root):
    pinned = {"model.revision": "abc123"}
    p = load_params(write_params(tmp_path, project_root, {**MODELS_ONLY, "model": ["tiny-qwen2-vl"]}, extra=pinned))
    assert len(ablations.expand_sweep(p)) == 1          # the base's own model: its pin applies
    p = load_params(write_params(tmp_path, project_root, {**MODELS_ONLY, "model": ["qwen3-vl-2b-instruct"]},
                                 extra=pinned))
    with pytest.raises(ParamsError, match=r"ablation\.model\[0\]: model\.revision \(abc123\) pins tiny-qwen2-vl"):
        ablations.expand_sweep(p)


def test_a_run_the_schema_refuses_is_named(tmp_path, project_root):
    # micro 16 / effective 16 is fine for the base; a run name with a slash is not a folder name
    p = load_params(write_params(tmp_path, project_root))
    p.run.name = "a/b"
    with pytest.raises(ParamsError, match=r"sweep run a/b-r32-top2-proj_trainable: run\.name"):
        ablations.expand_sweep(p)


# ---- running (fake notebook runner) ---------------------------------------------------------

class FakeRunner:
    """Records calls; fails where told (like runner.run_notebook: NotebookFailed naming the cell)."""

    def __init__(self, fail=()):
        self.calls = []
        self.fail = set(fail)          # {(run name suffix, notebook)}

    def __call__(self, name, params_file, run_name, out_dir, overrides=None, **kwargs):
        self.calls.append((run_name, name))
        p = load_params(params_file)
        assert p.run.name == run_name and Path(p.run_dir) == Path(out_dir)
        if any(run_name.endswith(s) and name == nb for s, nb in self.fail):
            raise NotebookFailed(f"{name} failed in cell 7 (execution 5: 'result = train.train(P)'): "
                                 f"RuntimeError: boom\n  executed copy with the traceback: {out_dir}/{name}.ipynb")
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / f"{name}.ipynb").write_text("{}", encoding="utf-8")


def test_sweep_runs_03_and_04_per_run_and_skips_finished_runs(tmp_path, project_root):
    p = load_params(write_params(tmp_path, project_root))
    fake = FakeRunner()
    out = ablations.sweep(p, runner=fake, echo=lambda *_: None)
    names = [o["run.name"] for o in ablations.expand_sweep(p)]
    assert fake.calls == [(n, nb) for n in names for nb in ("03_qlora_train", "04_eval")]
    assert [r["status"] for r in out["runs"]] == ["done"] * 3 and out["failures"] == []
    root = tmp_path / "outputs" / "base" / "sweep"
    for n in names:
        resolved = load_params(root / n / "params.yaml")    # one resolved params file per run
        assert resolved.train.max_steps == p.ablation.train_max_steps and resolved.run.name == n
        done = json.loads((root / n / ablations.DONE_MARKER).read_text(encoding="utf-8"))
        assert done["params_hash"] == ablations.run_fingerprint(resolved)
    assert json.loads((root / "sweep.json").read_text(encoding="utf-8"))["runs"][0]["base"] is True

    again = FakeRunner()
    out = ablations.sweep(p, runner=again, echo=lambda *_: None)
    assert again.calls == [] and [r["status"] for r in out["runs"]] == ["skipped"] * 3
    # adding an axis value runs only the new run
    p2 = load_params(write_params(tmp_path, project_root, {"lora_rank": [8, 16, 32], "top_k_layers": [2],
                                                           "projector": ["trainable", "frozen"],
                                                           "train_max_steps": p.ablation.train_max_steps,
                                                           "eval_max_images": p.ablation.eval_max_images}))
    third = FakeRunner()
    ablations.sweep(p2, runner=third, echo=lambda *_: None)
    assert {c[0] for c in third.calls} == {"base-r16-top2-proj_trainable"}


def test_adding_the_model_axis_runs_only_the_new_models(tmp_path, project_root, capsys):
    p = load_params(write_params(tmp_path, project_root))
    ablations.sweep(p, runner=FakeRunner(), echo=lambda *_: None)
    ablation = {**p.raw["ablation"], "max_runs": None, "model": ["tiny-qwen2-vl", "qwen3-vl-2b-instruct"]}
    p2 = load_params(write_params(tmp_path, project_root, ablation))
    fake = FakeRunner()
    out = ablations.sweep(p2, runner=fake, echo=lambda *_: None)
    new = "base-r32-top2-proj_trainable-qwen3-vl-2b-instruct"
    assert fake.calls == [(new, "03_qlora_train"), (new, "04_eval")]
    assert [r["status"] for r in out["runs"]] == ["skipped"] * 3 + ["done"]
    root = tmp_path / "outputs" / "base" / "sweep"
    assert load_params(root / new / "params.yaml").model.name == "qwen3-vl-2b-instruct"
    plan = json.loads((root / "sweep.json").read_text(encoding="utf-8"))
    assert [r["setting"]["model"] for r in plan["runs"]] == ["tiny-qwen2-vl"] * 3 + ["qwen3-vl-2b-instruct"]
    # an untrainable model stops the sweep before any notebook, in one line naming the key
    path = write_params(tmp_path, project_root, {**ablation, "model": ["qwen3-vl-2b-instruct", "paligemma-3b"]})
    fake = FakeRunner()
    with pytest.raises(ParamsError, match=r"ablation\.model\[1\]: 'paligemma-3b'"):
        ablations.sweep(load_params(path), runner=fake)
    assert fake.calls == []
    capsys.readouterr()
    assert main(["sweep", "--params", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert "ablation.model[1]" in err and len(err.splitlines()) == 1


def test_a_failed_run_is_reported_and_the_sweep_goes_on(tmp_path, project_root):
    p = load_params(write_params(tmp_path, project_root))
    fake = FakeRunner(fail={("r8-top2-proj_trainable", "03_qlora_train")})
    lines = []
    out = ablations.sweep(p, runner=fake, echo=lines.append)
    assert [r["status"] for r in out["runs"]] == ["done", "failed", "done"]
    assert ("base-r8-top2-proj_trainable", "04_eval") not in fake.calls      # 04 not run after 03 failed
    assert ("base-r32-top2-proj_frozen", "04_eval") in fake.calls            # the next run still ran
    (f,) = out["failures"]
    assert f["run"] == "base-r8-top2-proj_trainable" and f["notebook"] == "03_qlora_train"
    assert f["cell"] == 7 and f["error"] == "RuntimeError: boom"
    assert any("✘ base-r8-top2-proj_trainable · 03_qlora_train · cell 7" in line for line in lines)
    failed_dir = tmp_path / "outputs" / "base" / "sweep" / "base-r8-top2-proj_trainable"
    assert not (failed_dir / ablations.DONE_MARKER).exists()
    # next time only the failed run runs (it resumes in its folder)
    again = FakeRunner()
    out = ablations.sweep(p, runner=again, echo=lambda *_: None)
    assert again.calls == [("base-r8-top2-proj_trainable", "03_qlora_train"),
                           ("base-r8-top2-proj_trainable", "04_eval")]
    assert out["failures"] == []


def test_changed_params_rerun_and_keep_the_old_folder(tmp_path, project_root):
    p = load_params(write_params(tmp_path, project_root))
    ablations.sweep(p, runner=FakeRunner(), echo=lambda *_: None)
    p2 = load_params(write_params(tmp_path, project_root, train={"learning_rate": 1e-3}))
    fake = FakeRunner()
    ablations.sweep(p2, runner=fake, echo=lambda *_: None)
    assert len(fake.calls) == 6
    superseded = list((tmp_path / "outputs" / "base" / "sweep" / ablations.SUPERSEDED_DIR).iterdir())
    assert len(superseded) == 3 and all((d / ablations.DONE_MARKER).exists() for d in superseded)


def test_bad_params_or_missing_data_stop_before_any_notebook(tmp_path, project_root):
    path = write_params(tmp_path, project_root, {**SEED_AXES, "lora_rank": [0]})
    fake = FakeRunner()
    assert main(["sweep", "--params", str(path)]) == 2
    with pytest.raises(ParamsError):
        ablations.sweep(load_params(path), runner=fake)
    assert fake.calls == []
    path = write_params(tmp_path, project_root)
    shutil.rmtree(tmp_path / "outputs" / "data")
    assert main(["sweep", "--params", str(path)]) == 2
    with pytest.raises(FileNotFoundError):
        ablations.sweep(load_params(path), runner=fake)
    assert fake.calls == []
    assert not (tmp_path / "outputs" / "base").exists()          # nothing written, not even the lock


def test_sweep_dry_run_and_failures(tmp_path, project_root, capsys):
    path = write_params(tmp_path, project_root)
    assert main(["sweep", "--params", str(path), "--dry-run"]) == 0
    assert "base-r8-top2-proj_trainable" in capsys.readouterr().out
    assert not (tmp_path / "outputs" / "base" / "sweep").exists()
    assert main(["sweep", "--params", str(path), "--set", "ablation.max_runs=2", "--dry-run"]) == 0
    assert "base-r32-top2-proj_frozen" not in capsys.readouterr().out
    p = load_params(path)
    assert ablations.sweep(p, runner=FakeRunner(fail={("frozen", "04_eval")}), echo=lambda *_: None)["failures"]
    assert not ablations.sweep(p, runner=FakeRunner(), echo=lambda *_: None)["failures"]


def test_sweep_locks_the_base_run_folder(tmp_path, project_root):
    p = load_params(write_params(tmp_path, project_root))
    holders = []

    class LockProbe(FakeRunner):
        def __call__(self, name, *args, **kwargs):
            holders.append(json.loads((Path(p.run_dir) / ".jpcap.lock.json").read_text(encoding="utf-8")))
            return super().__call__(name, *args, **kwargs)

    ablations.sweep(p, runner=LockProbe(), echo=lambda *_: None)
    assert holders and {h["purpose"] for h in holders} == {"sweep"}
    assert not (Path(p.run_dir) / ".jpcap.lock.json").exists()       # released


# ---- compare (fixture metrics) --------------------------------------------------------------

N_IMAGES = 30


def _per_image(cider, seed):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(N_IMAGES):
        stats = [int(x) for x in rng.integers(3, 9, size=2)] + [6, 5, 4, 3] + [int(x) for x in rng.integers(0, 3, size=4)]
        out.append({"image_id": 1000 + i, "BLEU-4": 0.1, "ROUGE-L": 0.3, "CIDEr": float(cider[i]), "bleu_stats": stats})
    return out


def _fake_finished_run(run_dir: Path, cider_mean: float, seed: int, trainable: int, seconds: float,
                       model: str = "tiny-qwen2-vl"):
    rng = np.random.default_rng(seed)
    cider = np.clip(rng.normal(cider_mean, 0.2, N_IMAGES), 0, None)
    per = _per_image(cider, seed)
    (run_dir / "scores").mkdir(parents=True, exist_ok=True)
    (run_dir / "scores" / f"{model}+ft__test.json").write_text(json.dumps({"per_image": per}), encoding="utf-8")
    row = {"split": "test", "model_id": model, "adapter": "ft", "system": f"{model}+ft",
           "n_images": N_IMAGES, "n_missing": 0, "params_hash": "x", "run": run_dir.name}   # 04 writes run
    for m, v in (("BLEU-4", 0.1), ("ROUGE-L", 0.3), ("CIDEr", float(cider.mean()))):
        row.update({m: v, f"{m}_lo": v - 0.05, f"{m}_hi": v + 0.05})
    append_metrics_row(run_dir / "metrics.csv", {**row, "CIDEr": -1.0})    # an older row: superseded
    append_metrics_row(run_dir / "metrics.csv", row)
    (run_dir / "train_result.json").write_text(json.dumps({
        "trainable_params": trainable, "peak_memory_gib": 1.5, "peak_memory_kind": "CPU peak RSS",
        "seconds": seconds, "steps": 30, "final_train_loss": 4.0}), encoding="utf-8")
    return cider


def test_compare_collects_runs_costs_and_paired_tests(tmp_path, project_root):
    p = load_params(write_params(tmp_path, project_root))
    names = [o["run.name"] for o in ablations.expand_sweep(p)]
    root = tmp_path / "outputs" / "base" / "sweep"
    base_cider = _fake_finished_run(root / names[0], 1.0, 0, 500_000, 12.0)
    r8_cider = _fake_finished_run(root / names[1], 1.4, 1, 150_000, 10.0)
    # names[2] (projector frozen) never finished: reported as missing
    out = ablations.compare(p, echo=lambda *_: None)
    table = out["table"]
    assert list(table["run"]) == names[:2]
    assert list(table["lora_rank"]) == [32, 8] and list(table["base"]) == [True, False]
    assert math.isclose(table.loc[1, "CIDEr"], float(r8_cider.mean()))         # latest row, not the -1
    assert list(table["trainable_params"]) == [500_000, 150_000]
    assert list(out["missing"]["run"]) == [names[2]]
    paired = out["paired"]
    cider_row = paired[(paired.metric == "CIDEr") & (paired.run == names[1])].iloc[0]
    assert math.isclose(cider_row["difference"], float(r8_cider.mean() - base_cider.mean()))
    assert cider_row["ci_low"] <= cider_row["difference"] <= cider_row["ci_high"]
    assert 0 < cider_row["p_value"] <= 1
    reports = tmp_path / "outputs" / "base" / "reports"
    for name in ("ablation_results.csv", "ablation_results.md", "ablation_costs.csv", "ablation_paired.md",
                 "ablation_metrics_by_axis.png", "ablation_runs_CIDEr.png", "ablation_cost.png",
                 "ablation_paired.png"):
        assert (reports / name).stat().st_size > 0, name
    md = (reports / "ablation_results.md").read_text(encoding="utf-8")
    assert md.count("\n| base-r") == 2
    assert list(ablations.summary_table(table).columns) == list(ablations.SUMMARY_COLUMNS)
    assert list(ablations.summary_table(table, ci=True).columns)[5:8] == ["CIDEr", "CIDEr_lo", "CIDEr_hi"]


def test_compare_puts_models_side_by_side(tmp_path, project_root):
    p = load_params(write_params(tmp_path, project_root, {**MODELS_ONLY, "lora_rank": [8], "model": [
        "qwen2-vl-2b-instruct", "qwen3-vl-2b-instruct"]}))
    names = [o["run.name"] for o in ablations.expand_sweep(p)]
    root = tmp_path / "outputs" / "base" / "sweep"
    base_cider = _fake_finished_run(root / names[0], 1.0, 0, 500_000, 12.0)
    _fake_finished_run(root / names[1], 1.1, 1, 150_000, 10.0)
    q2_cider = _fake_finished_run(root / names[2], 1.6, 2, 9_000_000, 300.0, model="qwen2-vl-2b-instruct")
    _fake_finished_run(root / names[3], 1.8, 3, 8_000_000, 280.0, model="qwen3-vl-2b-instruct")
    out = ablations.compare(p, echo=lambda *_: None)
    table = out["table"]
    assert list(table.columns[:7]) == ["run", "label", "base", "lora_rank", "top_k_layers", "projector", "model"]
    assert list(table["model"]) == ["tiny-qwen2-vl", "tiny-qwen2-vl", "qwen2-vl-2b-instruct", "qwen3-vl-2b-instruct"]
    assert list(table["label"]) == ["r32-top2-proj_trainable", "r8-top2-proj_trainable",
                                    "r32-top2-proj_trainable-qwen2-vl-2b-instruct",
                                    "r32-top2-proj_trainable-qwen3-vl-2b-instruct"]
    assert list(table["system"])[2:] == ["qwen2-vl-2b-instruct+ft", "qwen3-vl-2b-instruct+ft"]
    assert list(out["costs"]["model"]) == list(table["model"]) and out["missing"].empty
    paired = out["paired"]
    q2 = paired[(paired.metric == "CIDEr") & (paired.run == names[2])].iloc[0]
    assert math.isclose(q2["difference"], float(q2_cider.mean() - base_cider.mean()))
    assert set(paired["run"]) == set(names[1:])
    # one column per varied axis (rank, model), one row per metric; the models' names on the model column
    fig = out["figures"]["ablation_metrics_by_axis"]
    assert len(fig.axes) == 2 * len(ablations.COMPARE_METRICS)
    assert [a.get_xlabel() for a in fig.axes[-2:]] == ["lora_rank", "model"]
    assert [t.get_text() for t in fig.axes[-1].get_xticklabels()] == [
        "qwen2-vl-2b-instruct", "qwen3-vl-2b-instruct", "tiny-qwen2-vl*"]
    md = (tmp_path / "outputs" / "base" / "reports" / "ablation_results.md").read_text(encoding="utf-8")
    assert "| qwen3-vl-2b-instruct |" in md


def test_the_failure_browser_labels_sweep_runs_with_their_model(tmp_path, project_root):
    from jpcap_helpers.analysis.browser import prediction_sources

    p = load_params(write_params(tmp_path, project_root, {**MODELS_ONLY, "lora_rank": [8],
                                                          "model": ["qwen3-vl-2b-instruct"]}))
    for o in ablations.expand_sweep(p):
        run_dir = Path(o["run.output_dir"]) / o["run.name"]
        (run_dir / "predictions").mkdir(parents=True)
        (run_dir / "predictions" / f"{o['model.name']}+ft__test.jsonl").write_text("", encoding="utf-8")
        (run_dir / ablations.DONE_MARKER).write_text("{}", encoding="utf-8")
    labels = [s.label for s in prediction_sources(p, "test", include_sweep=True)]
    assert labels == ["r32-top2-proj_trainable:tiny-qwen2-vl+ft", "r8-top2-proj_trainable:tiny-qwen2-vl+ft",
                      "r32-top2-proj_trainable-qwen3-vl-2b-instruct:qwen3-vl-2b-instruct+ft"]


def test_the_shipped_sweeps_vary_the_three_recipe_axes_only(tmp_path, project_root):
    for name in ("smoke.yaml", "colab_t4_ablations.yaml"):
        p = load_params(project_root / "params" / name)
        assert p.ablation.model == [] and ablations.swept_axes(p) == ["lora_rank", "top_k_layers", "projector"]
        assert {o["model.name"] for o in ablations.expand_sweep(p)} == {p.model.name}


def test_colab_t4_models_is_colab_t4_with_a_model_axis(project_root):
    models = load_params(project_root / "params" / "colab_t4_models.yaml")
    base = load_params(project_root / "params" / "colab_t4.yaml")
    for section in ("data", "model", "generation", "train", "evaluate"):
        assert getattr(models, section) == getattr(base, section), section
    assert models.run.name != base.run.name and models.run.persist_dir == base.run.persist_dir
    runs = ablations.expand_sweep(models)
    assert [o["model.name"] for o in runs] == ["qwen2-vl-2b-instruct", "qwen2.5-vl-3b-instruct", "qwen3-vl-2b-instruct"]
    assert [o["run.name"] for o in runs] == [
        "colab_t4_models-r32-top6-proj_trainable", "colab_t4_models-r32-top6-proj_trainable-qwen2.5-vl-3b-instruct",
        "colab_t4_models-r32-top6-proj_trainable-qwen3-vl-2b-instruct"]
    assert all("train.max_steps" not in o for o in runs)    # the whole recipe, not a short ablation run


def test_compare_with_no_finished_run(tmp_path, project_root, capsys):
    path = write_params(tmp_path, project_root)
    assert main(["compare", "--params", str(path)]) == 1
    assert "no sweep run of base has results yet" in capsys.readouterr().err


def test_markdown_table_escapes_pipes():
    import pandas as pd

    from jpcap_helpers.analysis import reports

    md = reports.markdown_table(pd.DataFrame({"a": ["x|y"], "b": [0.123456]}))
    assert md.splitlines() == ["| a | b |", "|---|---|", "| x\\|y | 0.1235 |"]


def test_axis_values_plot_in_numeric_order_with_all_last():
    from jpcap_helpers.analysis.reports import _axis_order

    assert _axis_order([32, np.int64(8), "all", 2, 8]) == [2, 8, 32, "all"]
    assert _axis_order(["trainable", "frozen"]) == ["frozen", "trainable"]
