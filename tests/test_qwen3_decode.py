"""The static-cache greedy decoder on Qwen3-VL (tiny random Qwen3-VL with scrambled weights, CPU, fp32):
the same tokens as HF greedy ``generate`` — its own prefill (deepstack features added after the first
layers, per-head q/k norms) and the model-forward prefill, batched = one image at a time, with an
unmerged adapter, through the caption engine — and a prefill without the deepstack features does not
give them. GPU tests (marker ``gpu``) skip without CUDA: CUDA-graph decoding of Qwen3-VL-2B's real shape."""
from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image

from jpcap_helpers import engine
from jpcap_helpers import io as jio
from jpcap_helpers.engine import decode, generation
from jpcap_helpers.models import resolve
from tests.test_engine import check_graph_decoder_tokens, copy_processor, scramble_weights

CUDA = torch.cuda.is_available()
GRID_SIZE = (112, 84)      # every test image resized to one size: one visual grid per batch


@pytest.fixture(scope="module")
def qwen3(tiny_qwen3_dir, toy_root):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen3_dir).eval()
    scramble_weights(model)
    processor = AutoProcessor.from_pretrained(tiny_qwen3_dir)
    entry = resolve(str(tiny_qwen3_dir))
    files = sorted((toy_root / "val2014").glob("*"))[:6]
    images = [engine.load_image_for_model(f).resize(GRID_SIZE) for f in files]
    return {"model": model, "processor": processor, "entry": entry, "images": images, "files": files}


def prompt_inputs(q, images):
    prompt = engine.build_prompt(q["entry"], q["processor"])
    return generation.prepare_inputs(q["processor"], [prompt] * len(images), images)


def hf_greedy(model, inputs, n: int, eos: list[int]) -> torch.Tensor:
    pad = model.generation_config.pad_token_id
    cfg = generation.generation_config(model, n, 1, eos, 0 if pad is None else pad)
    with torch.no_grad():
        return model.generate(**inputs, generation_config=cfg)[:, inputs["input_ids"].shape[1]:]


def test_family_is_decoded_by_the_greedy_decoder(qwen3):
    assert qwen3["entry"].family == "qwen3_vl" and decode.supports(qwen3["model"], "qwen3_vl")
    assert hasattr(qwen3["model"].model.language_model.layers[0].self_attn, "q_norm")
    assert len(qwen3["model"].config.vision_config.deepstack_visual_indexes) == 2


@pytest.mark.parametrize("prefill", ["own", "model"])
def test_greedy_tokens_equal_hf_generate(qwen3, prefill):
    model, pad = qwen3["model"], qwen3["model"].generation_config.pad_token_id
    inputs = prompt_inputs(qwen3, qwen3["images"][:4])
    ref = hf_greedy(model, inputs, 12, [])            # no end token: all 12 steps compared
    got = decode.GreedyDecoder(model, eos_ids=[], pad_id=pad, max_batch=4, prefill=prefill).generate(inputs, 12)
    assert torch.equal(got, ref), (got, ref)
    assert len({tuple(r) for r in ref.tolist()}) > 1, "tokens should depend on the image"


def test_batched_equals_one_image_at_a_time(qwen3):
    model, pad = qwen3["model"], qwen3["model"].generation_config.pad_token_id
    images = qwen3["images"][:4]
    dec = decode.GreedyDecoder(model, eos_ids=[], pad_id=pad, max_batch=4)
    batched = dec.generate(prompt_inputs(qwen3, images), 10)
    for i, im in enumerate(images):
        single = dec.generate(prompt_inputs(qwen3, [im]), 10)
        assert torch.equal(single[0], batched[i]), i


def test_end_tokens_stop_rows_as_hf_does(qwen3):
    model, pad = qwen3["model"], qwen3["model"].generation_config.pad_token_id
    inputs = prompt_inputs(qwen3, qwen3["images"][:3])
    stop = int(hf_greedy(model, inputs, 12, [])[0, 3])
    ref = hf_greedy(model, inputs, 12, [stop])
    got = decode.GreedyDecoder(model, eos_ids=[stop], pad_id=pad, max_batch=4).generate(inputs, 12)
    assert torch.equal(got[:, :ref.shape[1]], ref) and bool((got[:, ref.shape[1]:] == pad).all())


def test_prefill_without_deepstack_gives_other_tokens(qwen3, monkeypatch):
    """The equality above can fail: the own prefill with the deepstack additions left out (the ids a
    Qwen2-VL-style prefill would give) does not reproduce HF's tokens."""
    model, pad = qwen3["model"], qwen3["model"].generation_config.pad_token_id
    inputs = prompt_inputs(qwen3, qwen3["images"][:4])
    ref = hf_greedy(model, inputs, 12, [])
    monkeypatch.setattr(decode, "add_deepstack_at", lambda h, where, feature: h)
    got = decode.GreedyDecoder(model, eos_ids=[], pad_id=pad, max_batch=4).generate(inputs, 12)
    assert not torch.equal(got, ref)


def test_unmerged_adapter_on_the_normed_projections(qwen3):
    """LoRA on q/k (inside Qwen3-VL's per-head norms), v and down, unmerged: the decoder's tokens are the
    adapted model's."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(qwen3["model"]), LoraConfig(
        r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|down_proj)"))
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)
    peft_model.eval()
    inputs = prompt_inputs(qwen3, qwen3["images"][:2])
    ref = hf_greedy(peft_model, inputs, 8, [])
    assert not torch.equal(ref, hf_greedy(qwen3["model"], inputs, 8, [])), "the adapter must change the output"
    assert decode.supports(peft_model, "qwen3_vl")
    assert torch.equal(decode.GreedyDecoder(peft_model, eos_ids=[], pad_id=0, max_batch=2).generate(inputs, 8), ref)


def test_caption_engine_uses_it_and_matches_hf(qwen3, toy_root, tmp_path):
    """Through the caption engine (toy files of several sizes: the engine groups them by grid): the fast
    decoder's captions equal HF generate's, batched and one at a time."""
    records = [{"image_id": i, "file_name": f"val2014/{f.name}"} for i, f in enumerate(qwen3["files"])]
    kw = dict(max_new_tokens=8, progress=False)
    args = (qwen3["model"], qwen3["processor"], qwen3["entry"], records, toy_root)
    fast = engine.caption_records(*args, tmp_path / "f.jsonl", batch_size=4, **kw)
    single = engine.caption_records(*args, tmp_path / "s.jsonl", batch_size=1, **kw)
    assert single["decoder"] == "static-cache greedy"
    hf = engine.caption_records(*args, tmp_path / "h.jsonl", batch_size=4, decoder="hf", **kw)
    assert (fast["decoder"], hf["decoder"]) == ("static-cache greedy", "hf generate")
    rows = {name: {r["image_id"]: r["caption"] for r in jio.read_jsonl(tmp_path / f"{name}.jsonl")}
            for name in ("f", "s", "h")}
    assert fast["n_errors"] == 0 and len(rows["f"]) == len(records)
    assert rows["f"] == rows["s"] == rows["h"]


@pytest.mark.slow
def test_compiled_own_prefill_and_step_are_exact(qwen3):
    """The prefill and step layer functions under ``torch.compile`` (GPUs with ``model.compile``): same
    tokens on Qwen3-VL (CPU, fp32; ≈30 s of compilation)."""
    model = qwen3["model"]
    inputs = prompt_inputs(qwen3, qwen3["images"][:2])
    ref = hf_greedy(model, inputs, 6, [])
    torch._dynamo.reset()
    for options in ({"compile_prefill": True}, {"compile_step": True}):
        got = decode.GreedyDecoder(model, eos_ids=[], pad_id=0, max_batch=2, **options).generate(inputs, 6)
        assert torch.equal(got, ref), options
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# GPU (the lead runs these): Qwen3-VL-2B's real shape, CUDA graphs
# ---------------------------------------------------------------------------------------------

@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.gpu
def test_gpu_greedy_decoder_real_shape_qwen3(qwen3):
    """Qwen3-VL-2B's shape (random weights, fp32: no rounding differences to flip an argmax), 640×480
    images at 448² pixels: CUDA-graph decoding, the compiled prefill and step, and the model-forward
    prefill give HF greedy decoding's tokens."""
    from conftest import qwen3_vl_2b_config
    from transformers import Qwen3VLForConditionalGeneration

    processor = copy_processor(qwen3["processor"], 448 * 448)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen3VLForConditionalGeneration(qwen3_vl_2b_config(processor.tokenizer)).eval()
    gen = torch.Generator().manual_seed(0)
    images = [Image.fromarray((torch.rand(480, 640, 3, generator=gen) * 255).byte().numpy()) for _ in range(6)]
    inputs = generation.prepare_inputs(processor, [engine.build_prompt(qwen3["entry"], processor)] * 6, images)
    ref = hf_greedy(model, inputs.to("cuda"), 12, []).cpu()
    check_graph_decoder_tokens(model, inputs, ref)
    del model
    torch.cuda.empty_cache()
