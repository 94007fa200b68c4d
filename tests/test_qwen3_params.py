"""params/colab_t4_qwen3.yaml: Qwen3-VL-2B with params/colab_t4.yaml's recipe, and the cost model's
numbers in its header — image tokens from the image processor's own resize rule at Qwen3-VL's patch 16,
TFLOP per caption from Qwen3-VL-2B's architecture (random weights on the meta device), T4 hours at the
cost model's assumed throughput (an ESTIMATE: no T4 was measured)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from jpcap_helpers.params import load_params
from jpcap_helpers.train.costs import cost_estimate, model_flops_per_caption

PROMPT_TEXT_TOKENS = 30     # the text around the image tokens, as in the Qwen2-VL figure (test_train.py)
CAPTION_TOKENS = 25         # STAIR captions ≈ 20–30 tokens (docs/training.md)


def image_grid(patch_size: int, min_pixels: int, max_pixels: int, width: int = 640, height: int = 480):
    """(patches, image tokens) of a COCO-sized image through the Qwen image processor's resize rule."""
    from transformers import Qwen2VLImageProcessor

    proc = Qwen2VLImageProcessor(patch_size=patch_size, merge_size=2, min_pixels=min_pixels, max_pixels=max_pixels)
    grid = proc(images=[np.zeros((height, width, 3), dtype=np.uint8)], return_tensors="pt")["image_grid_thw"][0]
    patches = int(grid.prod())
    return patches, patches // 4


def test_colab_t4_qwen3_is_colab_t4_with_qwen3():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    q3, q2 = load_params(root / "params" / "colab_t4_qwen3.yaml"), load_params(root / "params" / "colab_t4.yaml")
    assert q3.model.name == "qwen3-vl-2b-instruct" and q3.zero_shot.models == ["qwen3-vl-2b-instruct"]
    assert q3.run.name != q2.run.name and q3.run.persist_dir == q2.run.persist_dir
    for section in ("train", "data", "generation", "evaluate"):
        assert getattr(q3, section) == getattr(q2, section), section
    same_model = {k: v for k, v in vars(q3.model).items() if k != "name"}
    assert same_model == {k: v for k, v in vars(q2.model).items() if k != "name"}


def test_cost_model_sizes_the_qwen3_t4_preset(project_root, tiny_qwen3_dir):
    """The header's figures: 192 image tokens (768 patches) at 448² for a 640×480 image (Qwen2-VL: 234),
    ≈ 0.84 TFLOP per packed caption (≈ 3.2 unpacked), 80k captions ≈ 1.6 h on the estimated T4."""
    from conftest import qwen3_vl_2b_config
    from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration

    p = load_params(project_root / "params" / "colab_t4_qwen3.yaml")
    config = qwen3_vl_2b_config(AutoTokenizer.from_pretrained(tiny_qwen3_dir))
    patches, tokens = image_grid(config.vision_config.patch_size, p.model.min_pixels, p.model.max_pixels)
    assert (patches, tokens) == (768, 192)
    assert image_grid(14, p.model.min_pixels, p.model.max_pixels)[1] == 234    # Qwen2-VL at the same bounds
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(config)
    prefix = tokens + PROMPT_TEXT_TOKENS
    per_image = p.train.captions_per_image or 5
    unpacked = model_flops_per_caption(model, prefix, CAPTION_TOKENS, patches, 1)
    packed = model_flops_per_caption(model, prefix, CAPTION_TOKENS, patches, per_image)
    assert unpacked / 1e12 == pytest.approx(3.2, abs=0.05)
    assert packed / 1e12 == pytest.approx(0.84, abs=0.01)
    assert p.train.pack_captions
    captions = p.data.train_subset * 5 * p.train.epochs
    hours = cost_estimate(packed, captions)["hours"]
    assert hours == pytest.approx(1.6, abs=0.05) and hours <= 2.0
