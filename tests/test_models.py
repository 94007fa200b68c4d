"""Tiny model factory + registry: save/load round trip, forward/backward, batched generate."""
import pytest
import torch

from jpcap_helpers import fastpath, models
from jpcap_helpers.models import QWEN2_VL_SPECIAL_TOKENS, ModelError, resolve


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
    from jpcap_helpers.toydata import all_caption_texts

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


def test_remote_code_needs_explicit_opt_in():
    remote = [e for e in models.REGISTRY.values() if e.loader == "remote_code"]
    assert remote
    for entry in remote:
        with pytest.raises(ModelError, match="trust_remote_code"):
            resolve(entry.key)
        assert resolve(entry.key, trust_remote_code=True) is entry


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
