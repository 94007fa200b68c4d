"""fastpath: batched vision SDPA and lean SwiGLU/RMSNorm autograd give the unpatched model's numbers."""
from __future__ import annotations

import copy

import pytest
import torch

from jpcap_helpers.models import CAPTION_PROMPT_JA, fastpath


def _load(model_dir, attn="sdpa", dtype=torch.float32):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(model_dir, attn_implementation=attn, dtype=dtype)


def _images(toy_root, sizes):
    from PIL import Image

    paths = sorted((toy_root / "train2014").glob("*.jpg"))
    return [Image.open(p).convert("RGB").resize(s) for p, s in zip(paths, sizes)]


def _vision_inputs(model_dir, images):
    from transformers import AutoProcessor

    out = AutoProcessor.from_pretrained(model_dir).image_processor(images=images, return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


class _Counter:
    """Counts calls to a function it wraps (SDPA, Tensor.tolist)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


def _vision_run(visual, pixel_values, grid, monkeypatch):
    sdpa = _Counter(torch.nn.functional.scaled_dot_product_attention)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)
    with torch.no_grad():
        out = visual(pixel_values, grid_thw=grid)
    monkeypatch.undo()
    return out, sdpa.calls


def _distinct(cu_seqlens) -> int:
    """Number of distinct non-empty segment lengths (the patched forward's SDPA calls per block)."""
    return len({n for n in torch.as_tensor(cu_seqlens).diff().tolist() if n > 0})


# "mixed": equal lengths both back to back (sliced) and apart (64 at images 0, 1 and 5: gathered)
@pytest.mark.parametrize("sizes", [[(112, 112)] * 4, [(112, 112), (112, 112), (56, 112), (112, 56), (84, 84), (112, 112)]],
                         ids=["equal", "mixed"])
def test_batched_vision_attention_matches(tiny_model_dir, toy_root, sizes, monkeypatch):
    model = _load(tiny_model_dir).eval()
    visual = model.model.visual
    pixel_values, grid = _vision_inputs(tiny_model_dir, _images(toy_root, sizes))
    lengths = grid.prod(-1).tolist()
    depth = len(visual.blocks)
    before, calls_before = _vision_run(visual, pixel_values, grid, monkeypatch)
    assert calls_before == depth * len(sizes)                      # the original: one call per image per block

    assert fastpath.use_batched_vision_attention(model) == depth
    assert fastpath.use_batched_vision_attention(model) == 0       # idempotent
    after, calls_after = _vision_run(visual, pixel_values, grid, monkeypatch)
    assert calls_after == depth * len(set(lengths))                # one SDPA call per length per block
    if len(set(sizes)) == 1:
        assert calls_after == depth
    torch.testing.assert_close(after.last_hidden_state, before.last_hidden_state, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after.pooler_output, before.pooler_output, rtol=1e-5, atol=1e-5)


def test_segment_plan_read_once_per_vision_forward(tiny_model_dir, toy_root, monkeypatch):
    model = _load(tiny_model_dir).eval()
    pixel_values, grid = _vision_inputs(tiny_model_dir, _images(toy_root, [(112, 112)] * 3))

    def host_reads():
        counter = _Counter(torch.Tensor.tolist)
        monkeypatch.setattr(torch.Tensor, "tolist", lambda self, *a: counter(self, *a))
        with torch.no_grad():
            model.model.visual(pixel_values, grid_thw=grid)
        monkeypatch.undo()
        return counter.calls

    before = host_reads()
    fastpath.use_batched_vision_attention(model)
    depth = len(model.model.visual.blocks)
    # the original reads the lengths once per q/k/v split in every block; the patch once per forward
    assert depth > 1 and host_reads() == before - 3 * depth + 1


def test_batched_vision_attention_gradients_match(tiny_model_dir, toy_root):
    base = _load(tiny_model_dir).train()
    patched = copy.deepcopy(base)
    fastpath.use_batched_vision_attention(patched)
    pixel_values, grid = _vision_inputs(tiny_model_dir, _images(toy_root, [(112, 112), (56, 112), (112, 112)]))
    for m in (base, patched):
        m.model.visual(pixel_values, grid_thw=grid).pooler_output.square().sum().backward()
    for (name, a), b in zip(base.model.visual.named_parameters(), patched.model.visual.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_compiled_vision_blocks_do_not_recompile_for_each_segment_plan(tiny_model_dir, toy_root):
    """Under torch.compile the segment plan (Python ints, slices or gathers) stays out of the traced code:
    once two batch shapes have been seen, batches with new plans — other sizes, orders and slice/index
    mixes — compile nothing more (before, each new plan recompiled, up to dynamo's limit per frame)."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = _load(tiny_model_dir).eval()
    fastpath.use_batched_vision_attention(model)
    counter = CompileCounter()
    for block in model.model.visual.blocks:
        block.compile(backend=counter)
    a, b, c = (112, 112), (56, 112), (84, 84)
    plans = [[a, a], [a, c, b], [b, a, b], [a, c, a, b], [c, b, c, a, a], [b, c, a, c, b, a]]  # 2nd: all dims change
    counts = []
    with torch.no_grad():
        for sizes in plans:
            model.model.visual(*_vision_inputs(tiny_model_dir, _images(toy_root, sizes)))
            counts.append(counter.frame_count)
    torch._dynamo.reset()
    assert counts[1] > 0 and counts[-1] == counts[1], counts   # the 2nd shape made it dynamic; then nothing


def test_non_sdpa_vision_attention_is_left_alone(tiny_model_dir):
    eager = _load(tiny_model_dir, attn="eager")
    assert fastpath.use_batched_vision_attention(eager) == 0
    flash = _load(tiny_model_dir)
    for module in flash.model.visual.modules():                    # flash_attn is not installed on CPU
        if hasattr(module, "qkv"):
            module.config._attn_implementation_internal = "flash_attention_2"
    assert flash.model.visual.blocks[0].attn.config._attn_implementation == "flash_attention_2"
    assert fastpath.use_batched_vision_attention(flash) == 0
    assert not any("forward" in m.__dict__ for m in flash.modules() if hasattr(m, "qkv"))


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_batched_vision_attention_other_families(family, monkeypatch):
    import transformers as tf

    vision = dict(depth=3, num_heads=2, in_channels=3, spatial_merge_size=2, temporal_patch_size=2, hidden_size=32,
                  intermediate_size=64, out_hidden_size=32)
    if family == "qwen2_5_vl":   # windows of 2x2 merged tokens: images not a multiple of it get unequal windows
        cfg, cls, patch = (tf.Qwen2_5_VLVisionConfig(**vision, patch_size=14, window_size=56, fullatt_block_indexes=[1]),
                           tf.Qwen2_5_VLForConditionalGeneration, 14)
    else:
        cfg, cls, patch = (tf.Qwen3VLVisionConfig(**vision, patch_size=16, num_position_embeddings=64,
                                                  deepstack_visual_indexes=[0]), tf.Qwen3VLForConditionalGeneration, 16)
    torch.manual_seed(0)
    visual = cls.config_class(vision_config=cfg.to_dict()).vision_config
    visual = (tf.Qwen2_5_VisionTransformerPretrainedModel if family == "qwen2_5_vl" else tf.Qwen3VLVisionModel)(visual)
    visual.eval()
    assert visual.blocks[0].attn.config._attn_implementation == "sdpa"
    grid = torch.tensor([[1, 6, 10], [1, 8, 8], [1, 8, 8], [1, 4, 4]])
    pixel_values = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * patch * patch)
    before, calls_before = _vision_run(visual, pixel_values, grid, monkeypatch)
    assert fastpath.use_batched_vision_attention(visual) == 3
    after, calls_after = _vision_run(visual, pixel_values, grid, monkeypatch)
    image_lengths = len(set(grid.prod(-1).tolist()))
    if family == "qwen2_5_vl":   # window blocks: one call per distinct window length; full blocks: per image length
        from transformers.vision_utils import get_vision_window_index

        _, windows = get_vision_window_index(grid, cfg.spatial_merge_size, cfg.window_size, cfg.patch_size)
        assert _distinct(windows) > 1
        assert calls_after == 2 * _distinct(windows) + image_lengths
    else:
        assert calls_after == 3 * image_lengths
    assert calls_after < calls_before
    torch.testing.assert_close(after.last_hidden_state, before.last_hidden_state, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after.pooler_output, before.pooler_output, rtol=1e-5, atol=1e-5)


# --- lean activations -------------------------------------------------------------------------------------

def _text_batch(model_dir, toy_root, n=3):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": CAPTION_PROMPT_JA}]},
            {"role": "assistant", "content": [{"type": "text", "text": "白い背景に赤い円が一つある。"}]}]
    prompt = processor.apply_chat_template(msgs)
    return processor(text=[prompt] * n, images=_images(toy_root, [(112, 112), (84, 112), (112, 84)][:n]),
                     return_tensors="pt", padding=True)


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _expected_lean_count(model):
    cfg = model.config.text_config
    return 3 * cfg.num_hidden_layers + 1        # per layer: MLP + 2 RMSNorms; plus the final norm


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)], ids=["fp32", "bf16"])
def test_lean_activations_loss_and_grads_match(tiny_model_dir, toy_root, dtype, tol):
    base = _load(tiny_model_dir, dtype=dtype).train()
    patched = copy.deepcopy(base)
    assert fastpath.use_lean_activations(patched) == _expected_lean_count(base)
    assert fastpath.use_lean_activations(patched) == 0
    assert not any("forward" in m.__dict__ for m in patched.model.visual.modules())
    batch = _text_batch(tiny_model_dir, toy_root)
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    loss_a, grads_a = _loss_and_grads(base, batch)
    loss_b, grads_b = _loss_and_grads(patched, batch)
    if dtype == torch.float32:
        torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-6)
    else:
        torch.testing.assert_close(loss_b, loss_a, rtol=1e-2, atol=1e-2)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == len(list(base.parameters()))
    for name, g in grads_a.items():
        scale = g.float().abs().max().item() + 1e-12                 # bf16 grads: compare relative to the tensor
        torch.testing.assert_close(grads_b[name].float() / scale, g.float() / scale, rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("four_bit", [False, True], ids=["lora", "qlora"])
def test_lean_activations_with_lora(tiny_model_dir, toy_root, four_bit):
    from jpcap_helpers import models

    peft = pytest.importorskip("peft")
    if four_bit:
        pytest.importorskip("bitsandbytes")
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(
            tiny_model_dir, quantization_config=models.quantization_config(torch.float32), dtype=torch.float32)
        assert models.cpu_safe_4bit(model) > 0
    else:
        model = _load(tiny_model_dir)
    base = peft.get_peft_model(model, peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=r".*language_model.*\.(gate_proj|up_proj|down_proj)"))
    with torch.no_grad():                                   # non-zero B so the LoRA path matters
        for n, p in base.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    patched = copy.deepcopy(base)
    assert fastpath.use_lean_activations(patched) == _expected_lean_count(base.base_model.model)
    batch = _text_batch(tiny_model_dir, toy_root, n=2)
    loss_a, grads_a = _loss_and_grads(base, batch)
    loss_b, grads_b = _loss_and_grads(patched, batch)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-6)
    assert grads_a and grads_a.keys() == grads_b.keys() and all("lora_" in n for n in grads_a)
    for name, g in grads_a.items():
        torch.testing.assert_close(grads_b[name], g, rtol=1e-5, atol=1e-6, msg=name)


def _saved_bytes(model, batch) -> int:
    """Bytes autograd keeps for backward in one forward (unique storages)."""
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()                                          # the graph is usable with the patches
    return sum(seen.values())


def test_lean_activations_save_less_for_backward(tiny_model_dir, toy_root):
    base = _load(tiny_model_dir, dtype=torch.bfloat16).train()
    base.model.visual.requires_grad_(False)
    patched = copy.deepcopy(base)
    fastpath.use_lean_activations(patched)
    batch = _text_batch(tiny_model_dir, toy_root)
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    before, after = _saved_bytes(base, batch), _saved_bytes(patched, batch)
    print(f"\nsaved for backward (bf16, vision frozen): unpatched {before} B, lean {after} B "
          f"({100 * (before - after) / before:.1f}% less)")
    assert after < before


# --- the Functions on their own ---------------------------------------------------------------------------

def test_swiglu_function_gradcheck_and_forward():
    gen = torch.Generator().manual_seed(0)
    gate = torch.randn(3, 5, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    up = torch.randn(3, 5, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(fastpath.SwiGLUFunction.apply, (gate, up))
    x = torch.randn(4, 16, dtype=torch.bfloat16, generator=gen)
    assert torch.equal(fastpath.SwiGLUFunction.apply(x, x.flip(0)), torch.nn.functional.silu(x) * x.flip(0))


def test_rmsnorm_function_gradcheck_and_bit_identical_forward():
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRMSNorm

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: fastpath.RMSNormFunction.apply(a, b, 1e-6), (x, w))
    frozen = w.detach()
    assert torch.autograd.gradcheck(lambda a: fastpath.RMSNormFunction.apply(a, frozen, 1e-6), (x,))
    norm = Qwen2VLRMSNorm(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(8, generator=gen))
    for dtype in (torch.float32, torch.bfloat16):
        norm.to(dtype)
        xs = torch.randn(4, 5, 8, dtype=dtype, generator=gen) * 3
        assert torch.equal(fastpath.RMSNormFunction.apply(xs, norm.weight, norm.variance_epsilon), norm(xs))


def test_compile_blocks_tuned_passes_the_tuning_options():
    """``tuned=True`` compiles each block with fastpath.TUNING_OPTIONS (inductor's coordinate-descent tuning);
    untuned, with none; a mode (CUDA graphs) and tuning are refused together, before anything compiles."""
    seen = []

    def backend(gm, example_inputs, options=None):   # a custom backend receives torch.compile's options
        seen.append(options)
        return gm.forward

    x = torch.randn(2, 4)
    for tuned in (True, False):
        block = torch.nn.Linear(4, 4)
        assert fastpath.compile_blocks([block], tuned=tuned, backend=backend) == 1
        block(x)
    torch._dynamo.reset()
    assert seen == [fastpath.TUNING_OPTIONS, None]
    with pytest.raises(ValueError, match="tuned=True and a mode"):
        fastpath.compile_blocks([torch.nn.Linear(4, 4)], tuned=True, mode="reduce-overhead")


@pytest.mark.parametrize("tuning", ["off", "training", "all"])
def test_compile_tuning_reaches_the_blocks_it_names(tiny_model_dir, monkeypatch, tuning):
    """model.compile_tuning: ``training`` tunes the ViT blocks of a model loaded for training (and prepare_model
    its language layers: test_train), ``all`` also the captioning model's ViT and the caption engine's compiled
    layer functions, ``off`` none. CPU: compile_blocks and torch.compile recorded, nothing compiled."""
    from jpcap_helpers import models
    from jpcap_helpers.engine import decode
    from jpcap_helpers.params import Params

    vit_tuned, compiled_with = [], []
    monkeypatch.setattr(fastpath, "compile_supported", lambda model_type: True)   # as on a GPU ≥ 8.0
    monkeypatch.setattr(fastpath, "compile_blocks", lambda blocks, tuned=False, **kw: vit_tuned.append(tuned))
    monkeypatch.setattr(decode, "_COMPILED", {})
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled_with.append(kw.get("options")) or fn)
    params = Params.from_dict({"model": {"name": str(tiny_model_dir), "compile_tuning": tuning}}, check_paths=False)
    for for_training in (True, False):
        model, _, _ = models.load_model(params, for_training=for_training)
    assert vit_tuned == [tuning != "off", tuning == "all"]
    assert model.jpcap_compile_tuning is (tuning == "all")
    decode.GreedyDecoder(model, eos_ids=[0], pad_id=0, max_batch=2, cuda_graphs=False, compile_prefill=True,
                         compile_step=True)
    assert compiled_with == [fastpath.TUNING_OPTIONS if tuning == "all" else None] * 3
