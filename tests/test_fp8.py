"""FP8 products for captioning (``generation.fp8``): the layer's numerics, which layers a scope converts,
and the refusals before any weights load. The speed is measured in benchmarks (bench_generate --fp8)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from jpcap_helpers import models
from jpcap_helpers.data import toy as toydata
from jpcap_helpers.models import build_tiny_model, fp8
from jpcap_helpers.params import Params, ParamsError, TinyModelParams

CUDA = torch.cuda.is_available()
FP8_GPU = CUDA and torch.cuda.get_device_capability() >= fp8.MIN_CAPABILITY


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref.float()).norm() / ref.float().norm()).item()


def test_float8_linear_is_close_to_the_linear_but_not_equal():
    torch.manual_seed(0)
    linear = nn.Linear(256, 96)
    x = torch.randn(3, 40, 256)
    layer = fp8.Float8Linear.from_linear(linear)
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale.shape == (1, 96)
    got, ref = layer(x), linear(x)
    assert got.shape == ref.shape == (3, 40, 96) and got.dtype == x.dtype
    err = relative_error(got, ref)
    assert 1e-3 < err < 0.06   # e4m3 keeps 3 mantissa bits: a few per cent, never exact


def test_each_row_is_scaled_on_its_own():
    """Dynamic per-row scaling: a row 10,000× larger than the others does not cost them their precision
    (one scale for the whole tensor would flush the small rows to zero)."""
    torch.manual_seed(1)
    linear = nn.Linear(128, 64, bias=False)
    x = torch.randn(16, 128)
    x[0] *= 1e4
    got = fp8.Float8Linear.from_linear(linear)(x)
    ref = linear(x)
    for row in range(16):
        assert relative_error(got[row], ref[row]) < 0.06, row


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    toydata.generate_jp_shapes(root / "data", n_train=8, n_val=4, n_yj=2)
    model_dir = build_tiny_model(root / "models" / "tiny-qwen2-vl", toydata.all_caption_texts(root / "data"),
                                 TinyModelParams(), 56 * 56, 112 * 112)
    return root, model_dir


def _load(model_dir: Path):
    from transformers import AutoModelForImageTextToText
    return AutoModelForImageTextToText.from_pretrained(model_dir).eval()


def test_scopes_convert_the_language_layers_then_the_vision_blocks(tiny):
    _, model_dir = tiny
    cfg = json.loads((model_dir / "config.json").read_text())
    n_text = cfg.get("text_config", cfg).get("num_hidden_layers")
    n_vision = cfg["vision_config"]["depth"]
    language, everything = _load(model_dir), _load(model_dir)
    assert fp8.to_fp8(language, "language") == 7 * n_text    # q, k, v, o, gate, up, down
    assert fp8.to_fp8(everything, "all") == 7 * n_text + 4 * n_vision   # + qkv, proj, fc1, fc2
    assert fp8.to_fp8(_load(model_dir), "off") == 0
    for model in (language, everything):
        kept = {name for name, m in model.named_modules() if type(m) is nn.Linear}
        assert any("lm_head" in n for n in kept) and any("merger" in n for n in kept)
        assert not any(".layers." in n for n in kept)
    assert not any(isinstance(m, fp8.Float8Linear) for m in language.model.visual.modules())
    assert all(type(b.mlp.fc1) is fp8.Float8Linear for b in everything.model.visual.blocks)
    with pytest.raises(ValueError, match="generation.fp8 must be one of"):
        fp8.to_fp8(language, "int4")


def test_the_converted_model_still_runs_and_stays_near_the_original(tiny):
    root, model_dir = tiny
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    image = Image.open(next((root / "data" / "val2014").glob("*.jpg"))).convert("RGB")
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "説明"}]}],
                                         add_generation_prompt=True)
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    original, converted = _load(model_dir), _load(model_dir)
    fp8.to_fp8(converted, "all")
    with torch.no_grad():
        ref, got = original(**inputs).logits, converted(**inputs).logits
    assert torch.isfinite(got).all()
    assert 0 < relative_error(got, ref) < 0.1


def test_fp8_is_validated_and_refused_before_any_weights_load(tiny, monkeypatch):
    root, model_dir = tiny
    with pytest.raises(ParamsError, match="generation.fp8"):
        Params().with_overrides({"generation.fp8": "int4"})
    params = Params().with_overrides({"model.name": "tiny-qwen2-vl", "data.root": str(root / "data"),
                                      "generation.fp8": "language"})
    from transformers import AutoModelForImageTextToText

    def must_not_load(*a, **k):
        raise AssertionError("weights loaded before the refusal")

    if not FP8_GPU:   # CPU, or a GPU without FP8 tensor cores (T4, A100): one line naming the setting
        monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", must_not_load)
        with pytest.raises(models.ModelError, match=r"generation.fp8 needs .*set generation.fp8: off"):
            models.load_model(params, path=str(model_dir))
    # a 4-bit base that stays 4-bit (no adapter merged into its dequantized weights) has nothing to convert
    monkeypatch.setattr(fp8, "fp8_refusal", lambda device=None: None)
    with pytest.raises(models.ModelError, match="stays 4-bit: set model.load_in_4bit: false"):
        models.load_model(params.with_overrides({"model.load_in_4bit": True}), path=str(model_dir))
    with pytest.raises(models.ModelError, match="covers qwen2_vl, qwen2_5_vl, qwen3_vl, not paligemma-3b"):
        models.load_model(params, "paligemma-3b")
    monkeypatch.undo()
    # training ignores it: the trainer's model (and its validation captions) stay in full precision
    model, _, _ = models.load_model(params, for_training=True, path=str(model_dir))
    assert not any(isinstance(m, fp8.Float8Linear) for m in model.modules())


def test_fp8_model_is_recorded_in_the_weights_field(tiny, monkeypatch):
    """Where FP8 may run (mocked here on the CPU) the loaded model carries its scope in ``weights``,
    which the engine writes into every predictions file's ``.meta.json``."""
    root, model_dir = tiny
    monkeypatch.setattr(fp8, "fp8_refusal", lambda device=None: None)
    params = Params().with_overrides({"model.name": "tiny-qwen2-vl", "data.root": str(root / "data"),
                                      "generation.fp8": "all"})
    model, _, _ = models.load_model(params, path=str(model_dir))
    n = sum(isinstance(m, fp8.Float8Linear) for m in model.modules())
    assert n > 0 and model.jpcap_weights.endswith(f", fp8 all ({n} layers)")


@pytest.mark.skipif(not FP8_GPU, reason="needs a GPU of compute capability ≥ 8.9")
@pytest.mark.gpu
def test_gpu_fp8_engine_captions_with_the_fast_decoder(tiny, tmp_path):
    """On an H100/H200 the FP8 model (weights on the GPU) captions through the fast decoder: every image
    captioned, no error row."""
    from jpcap_helpers import engine

    root, model_dir = tiny
    params = Params().with_overrides({"model.name": "tiny-qwen2-vl", "data.root": str(root / "data"),
                                      "model.precision": "bf16", "generation.fp8": "all"})
    model, processor, entry = models.load_model(params, path=str(model_dir))
    assert next(m for m in model.modules() if isinstance(m, fp8.Float8Linear)).weight.is_cuda
    val = json.loads((root / "data" / "stair_captions_v1.2_val.json").read_text(encoding="utf-8"))
    records = [{"image_id": im["id"], "file_name": f"val2014/{im['file_name']}"} for im in val["images"]]
    s = engine.caption_records(model, processor, entry, records, root / "data", tmp_path / "p.jsonl",
                               batch_size=4, max_new_tokens=8, progress=False)
    assert s["decoder"] == "static-cache greedy" and s["n_errors"] == 0 and s["n_captioned"] == len(records)
