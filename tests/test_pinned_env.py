"""The pinned-environment runner (models/pinned_env.py, models/pinned_runner.py, engine/pinned.py) with
a tiny custom-code model of this project: a folder whose config.json has an ``auto_map`` to its own
``modeling_toy.py`` (what a remote-code hub repository looks like). The model names the dominant colour
of an image, so every caption can be checked.

Offline: an environment that adds no packages (it reuses this interpreter's transformers). Where the
package index is reachable, the same run in an environment pinned to transformers 4.45.2 (what Japanese
Stable VLM needs); skipped with the reason otherwise.
"""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from PIL import Image

from jpcap_helpers import io as jio
from jpcap_helpers.engine import caption_records_pinned
from jpcap_helpers.models import REGISTRY, ModelError, PinnedRecipe
from jpcap_helpers.models.pinned_env import ENV_STAMP, ensure_env, env_dir

CAPTIONS = ["赤い四角", "緑の丸", "青い星"]
COLOURS = {"red": (230, 10, 10), "green": (10, 220, 10), "blue": (10, 10, 230)}
CONFIG_PY = '''from transformers import PretrainedConfig


class ToyVlmConfig(PretrainedConfig):
    model_type = "jpcap_toy_vlm"

    def __init__(self, captions=None, **kwargs):
        self.captions = captions or []
        super().__init__(**kwargs)
'''
MODELING_PY = '''import torch
from transformers import PreTrainedModel

from .configuration_toy import ToyVlmConfig


class ToyVlm(PreTrainedModel):
    config_class = ToyVlmConfig
    main_input_name = "pixel_values"

    def __init__(self, config):
        super().__init__(config)
        self.colour = torch.nn.Linear(3, 3, bias=False)
        self.post_init()

    def _init_weights(self, module):
        pass

    def forward(self, pixel_values, **kwargs):
        return self.colour(pixel_values.float().mean(dim=(2, 3)))

    @torch.no_grad()
    def generate(self, pixel_values=None, input_ids=None, attention_mask=None, max_new_tokens=8, **kwargs):
        assert input_ids is not None and input_ids.shape[0] == pixel_values.shape[0]
        table = torch.tensor(self.config.captions, device=pixel_values.device)
        return table[self.forward(pixel_values).argmax(-1)][:, :max_new_tokens]
'''


def build_toy_remote_model(folder):
    """A custom-code model folder in the hub layout (config + auto_map modules + weights + processors)."""
    from safetensors.torch import save_file
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, SiglipImageProcessor

    folder.mkdir(parents=True)
    chars = sorted(set("".join(CAPTIONS)))
    vocab = {"[UNK]": 0, "[PAD]": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(folder)
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"  # as a 4.x-era repository names it
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))
    SiglipImageProcessor(size={"height": 28, "width": 28}).save_pretrained(folder)
    width = max(len(c) for c in CAPTIONS)
    ids = [[vocab[ch] for ch in c] + [1] * (width - len(c)) for c in CAPTIONS]
    (folder / "configuration_toy.py").write_text(CONFIG_PY)
    (folder / "modeling_toy.py").write_text(MODELING_PY)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "jpcap_toy_vlm", "architectures": ["ToyVlm"], "captions": ids, "pad_token_id": 1,
        "auto_map": {"AutoConfig": "configuration_toy.ToyVlmConfig",
                     "AutoModelForVision2Seq": "modeling_toy.ToyVlm",
                     "AutoModelForImageTextToText": "modeling_toy.ToyVlm"}}))
    save_file({"colour.weight": torch.eye(3)}, str(folder / "model.safetensors"), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("pinned")
    build_toy_remote_model(root / "model")
    images = root / "images"
    images.mkdir()
    records = []
    for i, (name, rgb) in enumerate(COLOURS.items()):
        Image.new("RGB", (40, 30), rgb).save(images / f"{name}.png")
        records.append({"image_id": i + 1, "file_name": f"{name}.png"})
    (images / "broken.png").write_bytes(b"not a png")
    entry = dataclasses.replace(REGISTRY["japanese-stable-vlm"], pinned=PinnedRecipe((), "vision2seq"))
    return dict(root=root, model=root / "model", images=images, records=records, entry=entry)


def _caption(toy, out, entry=None, records=None, env=None):
    return caption_records_pinned(entry or toy["entry"], str(toy["model"]), records or toy["records"], toy["images"],
                                  out, env_parent=env or toy["root"] / "envs", dtype="float32",
                                  load_in_4bit=False, extra={"split": "test"}, progress=False)


def test_offline_environment_captions_resumes_and_keeps_one_writer(toy, tmp_path):
    out = tmp_path / "pred.jsonl"
    records = toy["records"] + [{"image_id": 9, "file_name": "broken.png"}, {"image_id": 10, "file_name": "gone.png"},
                                toy["records"][0]]  # a duplicate record
    summary = _caption(toy, out, records=records)
    rows = {r["image_id"]: r for r in jio.read_jsonl(out)}
    assert {i: rows[i]["caption"] for i in (1, 2, 3)} == {1: CAPTIONS[0], 2: CAPTIONS[1], 3: CAPTIONS[2]}
    assert "error" in rows[9] and "not found" in rows[10]["error"]           # bad images: rows, not a crash
    assert all(r["model"] == "japanese-stable-vlm" and r["split"] == "test" for r in rows.values())
    assert summary["n_captioned"] == 3 and summary["n_errors"] == 2 and summary["n_duplicate_records"] == 1
    assert "pinned env" in summary["decoder"]
    again = _caption(toy, out, records=records)                               # resume: nothing left
    assert again["n_done"] == 0 and again["n_skipped_existing"] == 6 and len(list(jio.read_jsonl(out))) == 5
    # the environment reuses this interpreter's packages (no torch download) and is built once
    folder = env_dir(toy["root"] / "envs", "japanese-stable-vlm", ())
    stamp = json.loads((folder / ENV_STAMP).read_text())
    assert stamp["requirements"] == [] and any(".venv" in d or "site-packages" in d for d in stamp["parent_site"])


def test_a_killed_run_resumes_where_it_stopped(toy, tmp_path):
    out = tmp_path / "pred.jsonl"
    _caption(toy, out, records=toy["records"][:1])
    with open(out, "a", encoding="utf-8") as f:
        f.write('{"image_id": 2, "capt')  # a kill mid-line
    summary = _caption(toy, out)
    rows = list(jio.read_jsonl(out))
    assert [r["image_id"] for r in rows] == [1, 2, 3] and summary["n_done"] == 2


def test_runner_failure_is_one_clear_error_and_keeps_rows(toy, tmp_path):
    broken = tmp_path / "model"
    import shutil

    shutil.copytree(toy["model"], broken)
    (broken / "modeling_toy.py").write_text("raise ImportError('this model needs a package you lack')\n")
    with pytest.raises(ModelError, match=r"japanese-stable-vlm: the pinned-environment runner stopped .*needs a package"):
        caption_records_pinned(toy["entry"], str(broken), toy["records"], toy["images"], tmp_path / "p.jsonl",
                               env_parent=toy["root"] / "envs", dtype="float32", load_in_4bit=False, progress=False)


def test_environment_building_is_cached_and_rebuilt_when_incomplete(tmp_path):
    python = ensure_env(tmp_path, "x", ())
    folder = env_dir(tmp_path, "x", ())
    mtime = (folder / ENV_STAMP).stat().st_mtime_ns
    assert ensure_env(tmp_path, "x", ()) == python and (folder / ENV_STAMP).stat().st_mtime_ns == mtime
    (folder / ENV_STAMP).unlink()  # a build killed half-way
    ensure_env(tmp_path, "x", ())
    assert (folder / ENV_STAMP).is_file()
    code = "import transformers, torch; print(transformers.__file__)"
    where = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout
    assert where.strip().startswith(str(next(p for p in sys.path if p.endswith("site-packages"))))


def _index_reachable() -> bool:
    if os.environ.get("JPCAP_OFFLINE") or os.environ.get("PIP_NO_INDEX"):
        return False
    try:
        socket.create_connection(("pypi.org", 443), timeout=3).close()
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _index_reachable(), reason="the package index (pypi.org) is not reachable: the "
                    "transformers 4.45.2 environment cannot be built here")
def test_transformers_445_environment_runs_the_custom_code_model(toy, tmp_path):
    """The registry's own recipe for Japanese Stable VLM (transformers 4.45.2 and its tokenizers/hub)."""
    entry = dataclasses.replace(toy["entry"], pinned=REGISTRY["japanese-stable-vlm"].pinned)
    out = tmp_path / "pred.jsonl"
    summary = _caption(toy, out, entry=entry, env=tmp_path / "envs")
    assert summary["decoder"] == "hf generate (pinned env, transformers 4.45.2)"
    assert [r["caption"] for r in jio.read_jsonl(out)] == CAPTIONS
