"""Rotary positions from the collators (``train.positions``, CPU): exactly the model's own
``get_rope_index`` for the tiny Qwen2-VL, Qwen2.5-VL and Qwen3-VL — plain rows right- and left-padded,
images of three grids, a missing image, packed rows — and the loss uses them (doubled positions change it; without
them the model's own give the same loss)."""
from __future__ import annotations

import pytest
import torch

from jpcap_helpers import models
from jpcap_helpers import train as T
from jpcap_helpers.train import packing
from jpcap_helpers.train.positions import rope_positions
from tests.test_packing import packed_samples, unpacked
from tests.test_train import make_params
from tests.test_train import project as project  # noqa: F401,F811  (the module-scoped fixture, reused)


def tiny(project, request, family: str):
    params = make_params(project, f"pos-{family}")
    if family != "qwen2_vl":
        params.model.name = str(request.getfixturevalue({"qwen2_5_vl": "tiny_qwen25_dir",
                                                         "qwen3_vl": "tiny_qwen3_dir"}[family]))
    model, processor, entry = models.load_model(params, for_training=True)
    assert model.config.model_type == family
    return params, model, processor, entry


def own_positions(model, batch: dict, attention_mask) -> torch.Tensor:
    pos, _ = T.causal_lm(model).model.get_rope_index(batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
                                                     image_grid_thw=batch["image_grid_thw"],
                                                     attention_mask=attention_mask)
    return pos


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_collator_positions_are_the_models_own(project, request, family):
    params, model, processor, entry = tiny(project, request, family)
    samples = unpacked(packed_samples(params, 3, 2))          # three grids, captions of different lengths
    samples[1] = {"image": None, "missing": "gone.jpg", "caption": samples[1]["caption"], "image_id": 0}
    for side in ("right", "left"):
        batch = T.CaptionCollator(processor, entry.prompt, side)(samples)
        assert (batch["attention_mask"] == 0).any()           # padded rows, so the mask matters
        assert torch.equal(batch["position_ids"], own_positions(model, batch, batch["attention_mask"])), side
    packed = packing.PackedCollator(processor, entry.prompt)(packed_samples(params, 3, 3))
    reference = packing.packed_position_ids(T.causal_lm(model), {k: v for k, v in packed.items() if k != "position_ids"})
    assert torch.equal(packed["position_ids"], reference)
    assert packed["position_ids"].dtype == packed["input_ids"].dtype


def test_the_loss_uses_the_batch_positions(project, request):
    params, model, processor, entry = tiny(project, request, "qwen2_vl")
    model = T.prepare_model(model, params)
    model.eval()
    batch = T.CaptionCollator(processor, entry.prompt, "right")(unpacked(packed_samples(params, 2, 2)))
    with torch.no_grad():
        s, n = T.caption_loss(model, batch)
        own, _ = T.caption_loss(model, {k: v for k, v in batch.items() if k != "position_ids"})
        moved, _ = T.caption_loss(model, dict(batch, position_ids=batch["position_ids"] * 2))
    assert s.item() == own.item()                                # the same positions: the same numbers
    assert abs(moved.item() - s.item()) > 1e-5 * abs(s.item())   # 3.4e-5 measured (tiny random model)


def test_a_grid_that_does_not_match_its_tokens_is_named():
    ids = torch.zeros(2, 6, dtype=torch.long)
    types = torch.tensor([[0, 1, 1, 1, 1, 0], [0, 1, 1, 1, 0, 0]])
    grid = torch.tensor([[1, 4, 4], [1, 4, 4]])                # 4 merged tokens each
    with pytest.raises(ValueError, match="row 1: 3 image tokens for a 1×4×4"):
        rope_positions(ids, types, grid, merge_size=2)
    pos = rope_positions(ids[:1], types[:1], grid[:1], merge_size=2)
    assert pos[:, 0].tolist() == [[0, 1, 1, 1, 1, 3], [0, 1, 1, 2, 2, 3], [0, 1, 2, 1, 2, 3]]
