"""Qwen2.5-VL on the training fast path (tiny random Qwen2.5-VL, CPU, fp32): its vision tower reorders the
patches into attention windows and puts the merged tokens back in image order after the merger; the fast
path's loss and LoRA / merger gradients equal transformers' own forward with labels (plain micro-batch of
images with different grids and caption lengths, and packed captions). GPU test (marker ``gpu``, skipped
without CUDA): compiled blocks give eager's losses on Qwen2.5-VL-3B's real shape."""
from __future__ import annotations

import pytest
import torch

from jpcap_helpers import train as T
from jpcap_helpers.models import fastpath
from jpcap_helpers.train import packing
from tests.test_packing import grads, packed_samples, unpacked
from tests.test_qwen3_train import QWEN25_3B, assert_grads_close, gpu, gpu_real_shape, q3_model, real_images
from tests.test_train import compiled_and_eager_losses, unpatched_copy
from tests.test_train import project as project  # noqa: F401,F811  (the module-scoped fixture, reused)


def test_windows_reorder_the_tokens(project, tiny_qwen25_dir):
    """The test below means something: the tower's window order is not the image order for these grids."""
    from transformers.vision_utils import get_vision_window_index

    params, model, processor, entry = q3_model(project, tiny_qwen25_dir)
    batch = T.CaptionCollator(processor, entry.prompt)(unpacked(packed_samples(params, 2, 1)))
    visual = T.causal_lm(model).model.visual
    window_index, _ = get_vision_window_index(batch["image_grid_thw"], visual.spatial_merge_size, visual.window_size,
                                              visual.patch_size)
    assert not torch.equal(window_index, torch.arange(len(window_index)))


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
def test_fast_path_loss_and_gradients_equal_transformers(project, tiny_qwen25_dir, packed):
    params, model, processor, entry = q3_model(project, tiny_qwen25_dir, gradient_checkpointing=True)
    reference = unpatched_copy(model)
    samples = packed_samples(params, 3 if packed else 2, 3 if packed else 1)
    plain = T.CaptionCollator(processor, entry.prompt, "right")(unpacked(samples))
    batch = packing.PackedCollator(processor, entry.prompt)(samples) if packed else plain
    s, n = T.caption_loss(model, batch)
    (s / n).backward()
    ref = T.plain_loss(reference, plain)
    ref.backward()
    assert (s / n).item() == pytest.approx(ref.item(), rel=1e-5)
    worst = assert_grads_close(grads(model), grads(reference))
    print(f"\nqwen2.5 {'packed' if packed else 'plain'}: |loss diff| {abs((s / n).item() - ref.item()):.2e}, "
          f"max |grad diff| {worst:.2e}")


@gpu
@pytest.mark.gpu
def test_gpu_real_shape_qwen25_compiled_blocks_same_loss(project, tiny_qwen25_dir, tmp_path_factory):
    """model.compile on Qwen2.5-VL-3B's shape (regional torch.compile of the windowed and full-attention
    ViT blocks and the language layers, on since run Q2): the same losses as eager, fp32, over two
    optimizer steps (as the Qwen2-VL and Qwen3-VL tests)."""
    assert "qwen2_5_vl" in fastpath.COMPILE_MEASURED
    samples = [{"image": im, "image_id": i, "captions": ["赤い丸と青い四角が並んでいる。"]}
               for i, im in enumerate(real_images(8))]
    runs = compiled_and_eager_losses(
        lambda compiled: gpu_real_shape(project, tiny_qwen25_dir, tmp_path_factory, f"gpu-q25-compile-{compiled}",
                                        hub_id=QWEN25_3B),
        lambda params, start: unpacked(samples[start:start + 4]))
    assert runs[True] == pytest.approx(runs[False], rel=1e-4), runs
