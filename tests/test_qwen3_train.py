"""Qwen3-VL on the training fast path (tiny random Qwen3-VL, CPU, fp32): LoRA and the projector — the
merger and the deepstack mergers — train; the fast path's loss and gradients equal transformers' own
forward with labels (plain micro-batches of images with different grids and caption lengths, packed
captions, 4-bit NF4, gradient checkpointing), and a fast path that drops or misplaces the deepstack
features does not; a short training run validates through the fast decoder and its adapter reloads.
GPU tests (marker ``gpu``) skip without CUDA: the same equalities on Qwen3-VL-2B's real shape."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from jpcap_helpers import models
from jpcap_helpers import train as T
from jpcap_helpers.models import deepstack
from jpcap_helpers.train import loss as loss_module
from jpcap_helpers.train import packing
from tests.test_packing import grads, packed_samples, unpacked
from tests.test_train import compiled_and_eager_losses, make_params, perturbed_with_reference, unpatched_copy
from tests.test_train import project as project  # noqa: F811  (the module-scoped fixture, reused)

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def q3_params(project, model_dir: Path, run: str, **train):
    params = make_params(project, run, **train)
    params.model.name = str(model_dir)
    return params


def q3_model(project, model_dir: Path, **train):
    """The tiny Qwen3-VL prepared for training (every layer LoRA, projector trainable unless said), its
    trainable weights perturbed so that LoRA B and the mergers all matter."""
    train = {"top_k_layers": "all", "projector": "trainable", **train}
    params = q3_params(project, model_dir, "q3", **train)
    model, processor, entry = models.load_model(params, for_training=True)
    model = T.prepare_model(model, params)
    model.eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return params, model, processor, entry


def assert_grads_close(fast: dict, plain: dict, rtol: float = 1e-4) -> float:
    """Every trainable tensor's gradient equal; returns the largest absolute difference."""
    assert fast.keys() == plain.keys() and fast
    worst = 0.0
    for k, g in fast.items():
        torch.testing.assert_close(g, plain[k], rtol=rtol, atol=1e-6, msg=k)
        worst = max(worst, float((g - plain[k]).abs().max()))
    return worst


# ---------------------------------------------------------------------------------------------
# what trains
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("projector", ["trainable", "frozen"])
def test_projector_is_the_merger_and_the_deepstack_mergers(project, tiny_qwen3_dir, projector):
    params = q3_params(project, tiny_qwen3_dir, "q3-prep", projector=projector, gradient_checkpointing=True)
    model, processor, entry = models.load_model(params, for_training=True)
    n_deepstack = len(model.config.vision_config.deepstack_visual_indexes)
    assert T.projector_modules(model) == ["merger"] + [f"deepstack_merger_list.{j}" for j in range(n_deepstack)]
    model = T.prepare_model(model, params)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    in_visual = {n for n in trainable if ".visual." in n}
    if projector == "trainable":
        assert {j for j in range(n_deepstack) if any(f".deepstack_merger_list.{j}." in n for n in in_visual)} \
            == set(range(n_deepstack))
        assert any(".visual.merger." in n for n in in_visual)
    else:
        assert not in_visual
    assert all("lora_" in n or ".merger." in n or ".deepstack_merger_list." in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    visual = T.causal_lm(model).model.visual
    assert not visual.patch_embed._forward_hooks, "no requires-grad hook on the ViT input"
    batch = T.CaptionCollator(processor, entry.prompt)(unpacked(packed_samples(params, 2, 1)))
    vit_out = []
    hook = visual.blocks[-1].register_forward_hook(lambda _m, _a, out: vit_out.append(out.requires_grad))
    embeds, sizes, feats = T.visual_features(T.causal_lm(model), batch["pixel_values"], batch["image_grid_thw"])
    hook.remove()
    assert vit_out == [False], "the frozen ViT builds no autograd graph"
    assert len(feats) == n_deepstack and all(f.shape == embeds.shape for f in feats)
    assert all(f.requires_grad == (projector == "trainable") for f in [embeds, *feats])
    s, _ = T.caption_loss(model, batch)
    s.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == trainable


# ---------------------------------------------------------------------------------------------
# the fast path equals transformers' forward
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("checkpointing", [True, False], ids=["checkpointing", "no-checkpointing"])
def test_fast_path_loss_and_gradients_equal_transformers(project, tiny_qwen3_dir, checkpointing):
    """A micro-batch of 2 images of different grids and captions of different lengths, right and left
    padded: the fast path (patched model, ViT without autograd, deepstack features through
    ``mm_encoder_outputs`` or the ``inputs_embeds`` route) against the unpatched model's loss."""
    params, model, processor, entry = q3_model(project, tiny_qwen3_dir, gradient_checkpointing=checkpointing)
    reference = unpatched_copy(model)
    samples = unpacked(packed_samples(params, 2, 2))[1:3]        # image 1 caption 2, image 2 caption 1
    report = {}
    for side in ("right", "left"):
        batch = T.CaptionCollator(processor, entry.prompt, side)(samples)
        assert len({tuple(g) for g in batch["image_grid_thw"].tolist()}) == 2
        lengths = (batch["labels"] != T.IGNORE_INDEX).sum(1)
        assert lengths[0] != lengths[1], "captions of different lengths"
        s, n = T.caption_loss(model, batch)
        (s / n).backward()
        ref = T.plain_loss(reference, batch)
        ref.backward()
        assert (s / n).item() == pytest.approx(ref.item(), rel=1e-5)
        report[side] = (abs((s / n).item() - ref.item()), assert_grads_close(grads(model), grads(reference)))
        with torch.no_grad():
            s2, n2 = T.caption_loss(model, batch, use_mm_encoder_outputs=False)
        assert (s2 / n2).item() == pytest.approx(ref.item(), rel=1e-5)
        assert int(n) == int((batch["labels"][:, 1:] != T.IGNORE_INDEX).sum())
    print(f"\nqwen3 plain (gc={checkpointing}): |loss diff|, max |grad diff| per padding side: {report}")


def test_packed_loss_and_gradients_equal_transformers(project, tiny_qwen3_dir):
    """Packing: 3 images of three grids with 5, 1 and 3 captions against transformers' loss over the
    unpacked rows (gradient checkpointing on)."""
    params, model, processor, entry = q3_model(project, tiny_qwen3_dir, gradient_checkpointing=True)
    reference = unpatched_copy(model)
    samples = packed_samples(params, 3, 5)
    samples[1]["captions"] = samples[1]["captions"][:1]
    samples[2]["captions"] = samples[2]["captions"][:3]
    packed = packing.PackedCollator(processor, entry.prompt)(samples)
    plain = T.CaptionCollator(processor, entry.prompt, "right")(unpacked(samples))
    assert len({tuple(g) for g in packed["image_grid_thw"].tolist()}) == 3
    s, n = T.caption_loss(model, packed)
    (s / n).backward()
    ref = T.plain_loss(reference, plain)
    ref.backward()
    assert int(n) == packing.target_count(plain)
    assert (s / n).item() == pytest.approx(ref.item(), rel=1e-5)
    worst = assert_grads_close(grads(model), grads(reference))
    with torch.no_grad():
        s2, n2 = T.caption_loss(model, packed, use_mm_encoder_outputs=False)
    assert (s2 / n2).item() == pytest.approx(ref.item(), rel=1e-5)
    print(f"\nqwen3 packed: |loss diff| {abs((s / n).item() - ref.item()):.2e}, max |grad diff| {worst:.2e}")


def test_packed_4bit_loss_and_gradients_equal_transformers(project, tiny_qwen3_dir):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    params, model, processor, entry = q3_model(project, tiny_qwen3_dir, load_in_4bit=True,
                                               gradient_checkpointing=True)
    lin = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert lin and all(not m.support_avx512bf16_for_cpu for m in lin)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in T.causal_lm(model).model.visual.modules())
    samples = packed_samples(params, 3, 3)
    samples[0]["captions"] = samples[0]["captions"][:2]
    # a 4-bit model cannot be deep-copied unpatched: transformers' forward with labels runs through the
    # same model (its patches are exact: tests/test_fastpath.py)
    for batch, reference_batch in [
        (T.CaptionCollator(processor, entry.prompt, "right")(unpacked(samples)[:2]),) * 2,
        (packing.PackedCollator(processor, entry.prompt)(samples),
         T.CaptionCollator(processor, entry.prompt, "right")(unpacked(samples))),
    ]:
        s, n = T.caption_loss(model, batch)
        (s / n).backward()
        fast = grads(model)
        ref = T.plain_loss(model, reference_batch)
        ref.backward()
        assert (s / n).item() == pytest.approx(ref.item(), rel=1e-5)
        worst = assert_grads_close(fast, grads(model))
        print(f"\nqwen3 4-bit {'packed' if 'segment_ids' in batch else 'plain'}: |loss diff| "
              f"{abs((s / n).item() - ref.item()):.2e}, max |grad diff| {worst:.2e}")


def test_dropped_or_misplaced_deepstack_breaks_equality(project, tiny_qwen3_dir, monkeypatch):
    """The equality tests can fail: with the deepstack features zeroed (as if dropped), or added one layer
    late, the fast path's loss is not transformers' loss."""
    params, model, processor, entry = q3_model(project, tiny_qwen3_dir)
    batch = T.CaptionCollator(processor, entry.prompt, "right")(unpacked(packed_samples(params, 2, 1)))
    original = loss_module.language_forward
    with torch.no_grad():
        ref = T.plain_loss(model, batch).item()
        s, n = T.caption_loss(model, batch)
        assert (s / n).item() == pytest.approx(ref, rel=1e-5)
        for wrong in (lambda feats: [torch.zeros_like(f) for f in feats], lambda feats: [torch.zeros_like(feats[0]), *feats]):
            monkeypatch.setattr(loss_module, "language_forward", lambda *a, deepstack=(), _w=wrong, **k:
                                original(*a, deepstack=_w(deepstack), **k))
            for route in (True, False):
                s, n = T.caption_loss(model, batch, use_mm_encoder_outputs=route)
                print(f"\nwrong deepstack (route mm={route}): |loss diff| {abs((s / n).item() - ref):.2e}")
                assert abs((s / n).item() - ref) > 1e-4, route
        monkeypatch.undo()


def test_add_deepstack_variants_equal_the_text_models_own(tiny_qwen3_dir):
    """:func:`deepstack.add_deepstack` (boolean mask) and :func:`deepstack.add_deepstack_at` (shared row
    layout, the decoder's) give ``Qwen3VLTextModel._deepstack_process``'s tensor bit for bit."""
    from transformers import AutoModelForImageTextToText

    lm = AutoModelForImageTextToText.from_pretrained(tiny_qwen3_dir).model.language_model
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 11, 64, generator=gen)
    where = torch.tensor([2, 3, 4, 7])
    mask = torch.zeros(3, 11, dtype=torch.bool)
    mask[:, where] = True
    feature = torch.randn(3 * 4, 64, generator=gen, dtype=torch.float64)   # cast to the hidden dtype, as HF
    expected = lm._deepstack_process(hidden, mask, feature)
    assert torch.equal(deepstack.add_deepstack(hidden, mask, feature), expected)
    assert torch.equal(deepstack.add_deepstack_at(hidden, where, feature), expected)


# ---------------------------------------------------------------------------------------------
# the training loop
# ---------------------------------------------------------------------------------------------

def test_training_run_validates_and_its_adapter_reloads(project, tiny_qwen3_dir):
    """Two packed steps through ``train()`` (validation captions through the fast decoder), the adapter
    holds LoRA and every projector merger, and reloaded it reproduces the trained model's logits."""
    params = q3_params(project, tiny_qwen3_dir, "q3-run", max_steps=2, micro_batch_size=2, effective_batch_size=4,
                       pack_captions=True, captions_per_image=2, eval_every=2, eval_images=2,
                       gradient_checkpointing=True)
    result = T.train(params, resume=False)
    assert result.steps == 2 and all(math.isfinite(v) for v in result.losses.values())
    assert result.final_val_loss is not None and math.isfinite(result.final_val_loss)
    adapter = Path(result.adapter_dir)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    n_deepstack = 2
    assert sorted(cfg["modules_to_save"]) == sorted(["merger"] + [f"deepstack_merger_list.{j}"
                                                                   for j in range(n_deepstack)])
    from safetensors import safe_open
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert all(any(f"deepstack_merger_list.{j}." in k for k in keys) for j in range(n_deepstack))
    assert not any("visual" in k and "merger" not in k for k in keys)
    trained, processor, entry = models.load_model(params, adapter=str(adapter), for_training=True)
    plain_base, _, _ = models.load_model(params, for_training=True)
    batch = T.CaptionCollator(processor, entry.prompt, "right")(unpacked(packed_samples(params, 2, 1)))
    with torch.no_grad():
        reloaded = trained.eval()(**batch, use_cache=False).logits
        base = plain_base.eval()(**batch, use_cache=False).logits
    assert not torch.allclose(reloaded, base, atol=1e-4), "the adapter changes the model"
    merged, _, _ = models.load_model(params, adapter=str(adapter))      # merged into the fp32 base
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch, use_cache=False).logits, reloaded, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# GPU (the lead runs these): Qwen3-VL-2B's real shape with random weights
# ---------------------------------------------------------------------------------------------

QWEN3_2B, QWEN25_3B = "Qwen/Qwen3-VL-2B-Instruct", "Qwen/Qwen2.5-VL-3B-Instruct"


def real_shape_dir(out: Path, tokenizer_dir: Path, hub_id: str = QWEN3_2B) -> Path:
    """``hub_id``'s architecture (conftest's ``qwen_vl_real_config``) with random fp32 weights, saved with the
    tokenizer and processor of the tiny model of its family in ``tokenizer_dir`` (special-token ids
    remapped to that tokenizer)."""
    from conftest import qwen_vl_real_config
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if (out / "config.json").exists():
        return out
    processor = AutoProcessor.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForImageTextToText.from_config(qwen_vl_real_config(hub_id, processor.tokenizer),
                                                        dtype=torch.float32)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    del model
    torch.cuda.empty_cache()
    return out


def gpu_real_shape(project, tiny_dir, tmp_path_factory, run: str, hub_id: str = QWEN3_2B, **train):
    """Params of ``hub_id``'s real shape (random weights, :func:`real_shape_dir`; ``tiny_dir`` the tiny model
    of its family) at 448², fp32: LoRA on the top 6 layers, rank 32, projector trainable."""
    folder = real_shape_dir(tmp_path_factory.getbasetemp() / f"{hub_id.split('/')[1].lower()}-random", tiny_dir,
                            hub_id)
    params = q3_params(project, folder, run, top_k_layers=6, lora_rank=32, lora_alpha=32, projector="trainable",
                       **train)
    params.model.max_pixels = 448 * 448
    params.model.precision = "fp32"   # fp32 so that rounding cannot hide a difference
    return params


def real_images(n: int) -> list:
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    sizes = [(640, 480), (480, 640), (500, 375), (612, 612)]
    return [Image.fromarray((torch.rand(sizes[i % 4][1], sizes[i % 4][0], 3, generator=gen) * 255).byte().numpy())
            for i in range(n)]


def relative_grad_errors(model, reference) -> dict:
    """Relative error of each trainable gradient tensor (sums over many tokens cancel elementwise)."""
    ref = dict(reference.named_parameters())
    return {k: float((p.grad - ref[k].grad).norm() / ref[k].grad.norm().clamp_min(1e-30))
            for k, p in model.named_parameters() if p.requires_grad}


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
def test_gpu_real_shape_qwen3_fast_path_equals_plain_path(project, tiny_qwen3_dir, tmp_path_factory, monkeypatch,
                                                          packed):
    """Qwen3-VL-2B's shape (random weights, fp32), 4 images of COCO-like sizes at 448², gradient
    checkpointing on: the fast path (plain or packed batches) gives transformers' loss (relative 1e-4) and
    the same LoRA / merger / deepstack-merger gradients (relative 1e-3 per tensor), as the Qwen2-VL test."""
    params = gpu_real_shape(project, tiny_qwen3_dir, tmp_path_factory, f"gpu-q3-{packed}", gradient_checkpointing=True)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)   # the plain Conv3d patch embed: full fp32
    model, processor, entry, reference = perturbed_with_reference(params)
    samples = [{"image": im, "image_id": i, "captions": caps} for i, (im, caps) in enumerate(zip(
        real_images(4), [["赤い丸と青い四角が並んでいる。", "白い背景の上の図形。"], ["緑の三角。"],
                         ["黄色い星が二つある。", "星。", "二つの黄色い星が描かれている絵。"], ["青い円。"]]))]
    plain = T.CaptionCollator(processor, entry.prompt, "right")(unpacked(samples) if packed else
                                                                 unpacked(samples)[:4])
    batch = packing.PackedCollator(processor, entry.prompt)(samples) if packed else plain
    to_cuda = lambda b: {k: v.to("cuda") if torch.is_tensor(v) else v for k, v in b.items()}  # noqa: E731
    s, n = T.caption_loss(model, to_cuda(batch))
    (s / n).backward()
    ref = T.plain_loss(reference, to_cuda(plain))
    ref.backward()
    assert (s / n).item() == pytest.approx(ref.item(), rel=1e-4)
    errors = relative_grad_errors(model, reference)
    assert any("deepstack_merger_list" in k for k in errors)
    assert max(errors.values()) < 1e-3, max(errors.items(), key=lambda kv: kv[1])
    print(f"\nqwen3-2b {'packed' if packed else 'plain'}: loss {ref.item():.6f}, |diff| "
          f"{abs((s / n).item() - ref.item()):.2e}, max relative grad error {max(errors.values()):.2e}")
    del model, reference
    torch.cuda.empty_cache()


@gpu
@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("precision", ["auto", "fp16"])
@pytest.mark.parametrize("method", ["qlora", "lora"])
def test_gpu_real_shape_qwen3_trains_in_half_precision(project, tiny_qwen3_dir, tmp_path_factory, method, precision):
    """The real shape trains through ``train()`` in half precision — the GPU's own (bf16 where native) and
    fp16 + GradScaler as on a T4 — packed, with gradient checkpointing: finite losses, no non-finite loss."""
    params = gpu_real_shape(project, tiny_qwen3_dir, tmp_path_factory, f"gpu-q3-{method}-{precision}", max_steps=8,
                            micro_batch_size=2, effective_batch_size=4, load_in_4bit=method == "qlora",
                            gradient_checkpointing=True, pack_captions=True, learning_rate=2e-4, lora_dropout=0.05)
    params.model.precision = precision
    result = T.train(params, resume=False)
    log = T.read_train_log(params.run_dir)
    assert log["loss"].map(math.isfinite).all(), log[["step", "loss", "skipped"]]
    assert (log["skipped"] == "non-finite loss").sum() == 0
    print(f"\nqwen3-2b {method} {precision}: peak {result.peak_memory_gib:.2f} GiB, losses "
          f"{[round(v, 3) for v in result.losses.values()]}")


@gpu
@pytest.mark.gpu
def test_gpu_real_shape_qwen3_compiled_blocks_same_loss(project, tiny_qwen3_dir, tmp_path_factory):
    """model.compile on Qwen3-VL-2B's shape (regional torch.compile of the ViT blocks and language layers,
    on since run C3): the same losses as eager, fp32, over two optimizer steps (as the Qwen2-VL test)."""
    samples = [{"image": im, "image_id": i, "captions": ["赤い丸と青い四角が並んでいる。"]}
               for i, im in enumerate(real_images(8))]
    runs = compiled_and_eager_losses(
        lambda compiled: gpu_real_shape(project, tiny_qwen3_dir, tmp_path_factory, f"gpu-q3-compile-{compiled}"),
        lambda params, start: unpacked(samples[start:start + 4]))
    assert runs[True] == pytest.approx(runs[False], rel=1e-4), runs
