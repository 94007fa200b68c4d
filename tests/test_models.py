"""Tiny model factory + registry: save/load round trip, forward/backward, batched generate."""
import pytest
import torch

from jpcap_helpers import models
from jpcap_helpers.models import QWEN2_VL_SPECIAL_TOKENS, ModelError, fastpath, resolve


def test_round_trip_forward_backward_generate(tiny_model_dir, toy_root):
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor, Qwen2VLForConditionalGeneration

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    assert isinstance(model, Qwen2VLForConditionalGeneration)
    tok = processor.tokenizer
    cfg = model.config
    # the config's special ids are the tokenizer's
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert cfg.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert model.generation_config.eos_token_id == [tok.convert_tokens_to_ids("<|im_end|>")]
    for t in QWEN2_VL_SPECIAL_TOKENS:
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1, t

    images = [Image.open(p).convert("RGB") for p in sorted((toy_root / "train2014").glob("*.jpg"))[:3]]
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": models.CAPTION_PROMPT_JA}]}]
    prompt = processor.apply_chat_template(msgs, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    batch = processor(text=[prompt] * 3, images=images, return_tensors="pt", padding=True)
    assert "mm_token_type_ids" in batch
    n_image_tokens = int((batch["input_ids"] == cfg.image_token_id).sum())
    assert n_image_tokens == int(batch["image_grid_thw"].prod(dim=1).sum()) // 4

    out = model(**batch, labels=batch["input_ids"])
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.model.visual.merger.mlp[0].weight.grad is not None

    model.eval()
    gen = model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert gen.shape[0] == 3 and gen.shape[1] <= batch["input_ids"].shape[1] + 5


def test_tokenizer_round_trips_japanese(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "白い背景に赤い円が一つある。"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert 4 < len(ids) < len(text.encode())  # sub-word, neither whole captions nor raw bytes


def test_build_is_cached_and_deterministic(tmp_path, toy_root):
    from jpcap_helpers.data import all_caption_texts

    texts = all_caption_texts(toy_root)
    a = models.build_tiny_model(tmp_path / "a", texts, max_pixels=112 * 112)
    b = models.build_tiny_model(tmp_path / "b", texts, max_pixels=112 * 112)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    mtime = (a / "model.safetensors").stat().st_mtime_ns
    models.build_tiny_model(tmp_path / "a", texts, max_pixels=112 * 112)
    assert (a / "model.safetensors").stat().st_mtime_ns == mtime


def test_registry_resolves_keys_and_hub_ids():
    assert resolve("qwen2-vl-2b-instruct").hub_id == "Qwen/Qwen2-VL-2B-Instruct"
    assert resolve("Qwen/Qwen2-VL-2B-Instruct").key == "qwen2-vl-2b-instruct"
    assert resolve("tiny-qwen2-vl").loader == "native"
    with pytest.raises(ModelError, match="unknown model"):
        resolve("gpt-vision-9000")


def _params(tmp_path, **model):
    from jpcap_helpers.params import Params

    return Params.from_dict({"run": {"output_dir": str(tmp_path)}, "model": model}, check_paths=False)


def test_remote_code_needs_a_per_model_opt_in(tmp_path):
    remote = [e for e in models.REGISTRY.values() if e.loader == "pinned_env"]
    assert remote and all(e.pinned is not None for e in remote)
    pinned = {"revision": "0123abc"}
    for entry in remote:
        assert resolve(entry.key) is entry  # naming it is fine; running its code needs the opt-in
        with pytest.raises(ModelError, match=rf"model.trust_remote_code: \[{entry.key}\]"):
            models.pinned_settings(_params(tmp_path, name=entry.key, **pinned), entry)
        # true opts in model.name only, never every model of a zero-shot list
        with pytest.raises(ModelError, match="trust_remote_code"):
            models.pinned_settings(_params(tmp_path, trust_remote_code=True, **pinned), entry)
        ok = models.pinned_settings(_params(tmp_path, name=entry.key, trust_remote_code=True, **pinned), entry)
        assert ok["revision"] == "0123abc"
        at = models.pinned_settings(_params(tmp_path, trust_remote_code=[f"{entry.hub_id}@feed42"]), entry)
        assert at["revision"] == "feed42"  # opt-in and pin in one list item
        listed = _params(tmp_path, trust_remote_code=[entry.key], allow_unpinned_remote_code=True)
        assert models.pinned_settings(listed, entry)["revision"] is None
        assert models.pinned_settings(listed, entry)["load_in_4bit"] is bool(entry.load_in_4bit)


def test_vision_tower_is_never_in_the_quantized_set():
    # transformers 5 matches skip patterns from the start of the name or as a suffix: "visual" alone
    # would not protect "model.visual.*".
    assert "model.visual" in models.SKIP_QUANT_MODULES


def test_choose_dtype_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("CPU-only expectations")
    assert models.choose_dtype("auto") == torch.float32
    assert models.choose_dtype("fp16") == torch.float16
    with pytest.raises(ModelError):
        models.choose_dtype("int3")


def test_linear_patch_embed_equals_the_conv3d(tiny_model_dir):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    embed = model.model.visual.patch_embed
    x = torch.randn(48, 3 * 2 * 14 * 14)
    before = embed(x)
    assert fastpath.use_linear_patch_embed(model) == 1
    after = embed(x)
    assert after.shape == before.shape
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


# --- precision from the compute capability (issue 13) ------------------------------------------------

def _fake_gpu(monkeypatch, capability):
    """A CUDA GPU of ``capability`` as torch reports it; is_bf16_supported says yes (as on a T4,
    where it counts emulation) and must not be what decides."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)


def test_t4_gets_fp16_and_refuses_bf16(monkeypatch):
    _fake_gpu(monkeypatch, (7, 5))
    assert models.bf16_native() is False
    assert models.choose_dtype("auto") == torch.float16
    with pytest.raises(ModelError, match=r"model\.precision.*use fp16 or auto"):
        models.choose_dtype("bf16")
    assert models.choose_dtype("fp16") == torch.float16


def test_ampere_and_newer_get_bf16(monkeypatch):
    for capability in ((8, 0), (8, 9), (9, 0)):
        _fake_gpu(monkeypatch, capability)
        assert models.bf16_native() is True
        assert models.choose_dtype("auto") == models.choose_dtype("bf16") == torch.bfloat16


def test_cpu_is_fp32_and_not_bf16_native(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert models.bf16_native() is False
    assert models.choose_dtype("auto") == torch.float32


# --- registry → family modules, remote-code revisions (issue 16) --------------------------------------

def test_every_family_has_a_module_with_the_protocol():
    for entry in models.REGISTRY.values():
        module = models.family_module(entry.family)
        for name in ("build_prompt", "processor_kwargs", "ANSWER_MARKER", "ECHO", "STOP_PATTERNS", "STOP_TOKENS"):
            assert hasattr(module, name), (entry.family, name)
        assert entry.family in module.FAMILIES
    with pytest.raises(ModelError, match="no module"):
        models.family_module("gpt_vision")


def test_remote_code_refuses_an_unpinned_revision():
    remote = [e for e in models.REGISTRY.values() if e.loader == "pinned_env"]
    assert remote
    for entry in remote:
        if entry.revision is None:
            with pytest.raises(ModelError, match="allow_unpinned_remote_code"):
                models.pinned_revision(entry)
            assert models.pinned_revision(entry, allow_unpinned=True) is None  # explicit yes
        assert models.pinned_revision(entry, "0123abc") == "0123abc"          # model.revision pins it
    native = models.REGISTRY["qwen2-vl-2b-instruct"]
    assert models.pinned_revision(native) == native.revision                   # native code: no pin needed


def test_pinned_models_check_opt_in_and_pin_before_any_environment_or_hub(tmp_path, monkeypatch):
    from jpcap_helpers.engine import runs

    entry = models.REGISTRY["japanese-stable-vlm"]
    monkeypatch.setattr(runs, "caption_records_pinned",
                        lambda *a, **k: pytest.fail("no environment may be built before the checks"))
    with pytest.raises(ModelError, match="pinned environment"):
        models.load_model(_params(tmp_path, name=entry.key))  # never into this process
    params = _params(tmp_path, name=entry.key, trust_remote_code=True)
    with pytest.raises(ModelError, match="allow_unpinned_remote_code"):
        runs._caption_splits_pinned(params, entry, {"test": tmp_path / "test.jsonl"}, None)
    # the Asagi fallback: model.loads: pinned_env sends it there too, with the same checks
    asagi = models.REGISTRY["asagi-2b"]
    fallback = _params(tmp_path, name="asagi-2b", loads="pinned_env")
    assert models.runs_pinned(fallback, asagi) and not models.runs_pinned(_params(tmp_path), asagi)
    with pytest.raises(ModelError, match=r"trust_remote_code: \[asagi-2b\]"):
        models.pinned_settings(fallback, asagi)
    assert not models.runs_pinned(fallback, models.REGISTRY["llava-jp-1.3b"])  # no recipe: the port


# --- adapters: the base loads as it was trained -------------------------------------------------------

def test_adapter_record_decides_4bit_and_warns_on_disagreement(tmp_path):
    import json

    from jpcap_helpers.params import Params

    params = Params.from_dict({"run": {"output_dir": str(tmp_path)}}, check_paths=False)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    assert models.adapter_load_in_4bit(params, adapter) is False                 # no record: model.load_in_4bit
    (adapter / models.ADAPTER_INFO_FILE).write_text(json.dumps(
        {"base_model": params.model.name, "base_load_in_4bit": True}), encoding="utf-8")
    with pytest.warns(UserWarning, match="load_in_4bit"):
        assert models.adapter_load_in_4bit(params, adapter) is True
    quantized = params.with_overrides({"model.load_in_4bit": True})
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert models.adapter_load_in_4bit(quantized, adapter) is True           # agreeing: silent
    (adapter / models.ADAPTER_INFO_FILE).write_text(json.dumps({"base_model": "another-model"}), encoding="utf-8")
    with pytest.warns(UserWarning, match="another-model"):
        assert models.adapter_load_in_4bit(quantized, adapter) is True
