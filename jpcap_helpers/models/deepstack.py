"""Qwen3-VL's deepstack visual features, computed and injected as transformers does (5.24,
``models/qwen3_vl/modeling_qwen3_vl.py``).

The vision tower (``Qwen3VLVisionModel``) runs its blocks; after block ``deepstack_visual_indexes[j]`` the
``deepstack_merger_list[j]`` (a patch merger with a post-shuffle norm) projects the block's output to the
language width: deepstack feature ``j``, one row per image token like the main ``merger``'s output. The
language model (``Qwen3VLTextModel``) adds feature ``j`` to the hidden states at the image-token positions
right after decoder layer ``j``, for ``j < len(features)`` (``_deepstack_process``: ``h[mask] + f`` with
``f`` cast to the hidden states' dtype). Qwen2-VL / Qwen2.5-VL have no deepstack: every function here
returns the empty case for them.

Used by the training fast path (:mod:`jpcap_helpers.train.loss`: the frozen ViT without an autograd
graph, the projector — merger and deepstack mergers — with it) and by the greedy decoder's own prefill
(:mod:`jpcap_helpers.engine.decode`).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

__all__ = ["deepstack_mergers", "projector_module_names", "projector", "tower_features", "encoder_output",
           "text_forward", "add_deepstack", "add_deepstack_at"]


def deepstack_mergers(visual: Any) -> list:
    """The vision tower's deepstack mergers in feature order (empty for towers without deepstack)."""
    return list(getattr(visual, "deepstack_merger_list", None) or [])


def projector_module_names(visual: Any) -> list[str]:
    """Module-name suffixes of the visual projector, as peft's ``modules_to_save`` matches them: the main
    ``merger`` and, for Qwen3-VL, each deepstack merger (one entry per list item, so that the list itself
    stays a list)."""
    return ["merger"] + [f"deepstack_merger_list.{j}" for j in range(len(deepstack_mergers(visual)))]


def projector(visual: Any) -> list:
    """The projector modules: the main ``merger`` and the deepstack mergers."""
    return [visual.merger, *deepstack_mergers(visual)]


def _to_weight_dtype(module: Any, args: tuple) -> tuple:
    """Forward pre-hook: the input in the dtype of the module's trainable weights (fp32 masters), else of
    its weights — what autocast does for its linear layers anyway, and needed without autocast."""
    params = [p for p in module.parameters() if p.requires_grad] or list(module.parameters())
    return (args[0].to(params[0].dtype), *args[1:])


def tower_features(visual: Any, pixel_values: torch.Tensor, grid_thw: torch.Tensor
                   ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(image embeddings, deepstack features) from the vision tower's own forward, in image order.

    The frozen tower builds no autograd graph without ``no_grad`` (its weights and inputs need no
    gradient), so autograd records from the projector on: the merger and the deepstack mergers when they
    train, and what the tower does after them (Qwen2.5-VL puts its window-ordered tokens back in image
    order after the merger). The projector's inputs are cast to its weights' dtype.
    """
    handles = [m.register_forward_pre_hook(_to_weight_dtype) for m in projector(visual)]
    try:
        out = visual(pixel_values, grid_thw=grid_thw)
    finally:
        for h in handles:
            h.remove()
    return out.pooler_output, list(getattr(out, "deepstack_features", None) or [])


def encoder_output(embeds: torch.Tensor, sizes: list[int], deepstack: Sequence[torch.Tensor]) -> Any:
    """The ``mm_encoder_outputs["image"]`` object the model's forward reads: per-image features
    (``pooler_output``) and, with deepstack, per-image deepstack features (``deepstack_features``, one
    tuple per layer), split as ``get_image_features`` splits them."""
    pooled = torch.split(embeds, sizes)
    if not deepstack:
        from transformers.modeling_outputs import BaseModelOutputWithPooling
        return BaseModelOutputWithPooling(pooler_output=pooled)
    from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures
    return BaseModelOutputWithDeepstackFeatures(pooler_output=pooled,
                                                deepstack_features=[torch.split(f, sizes) for f in deepstack])


def text_forward(inner: Any, inputs_embeds: torch.Tensor, input_ids: torch.Tensor,
                 deepstack: Sequence[torch.Tensor], *, attention_mask: Any, image_grid_thw: torch.Tensor,
                 mm_token_type_ids: Any = None, position_ids: Any = None, use_cache: bool = False) -> Any:
    """The ``inputs_embeds`` route for a deepstack model: Qwen3VLModel's forward takes either ids or
    embeddings (not both), so the language model is called as that forward calls it — 3-D rotary
    positions from ``get_rope_index`` (unless given), ``visual_pos_masks`` = the image tokens, the
    deepstack features in layer order."""
    if position_ids is None:
        position_ids, _ = inner.get_rope_index(input_ids, mm_token_type_ids=mm_token_type_ids,
                                               image_grid_thw=image_grid_thw,
                                               attention_mask=attention_mask if attention_mask.dim() == 2 else None)
    visual_pos_masks = input_ids == inner.config.image_token_id
    return inner.language_model(input_ids=None, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                position_ids=position_ids, use_cache=use_cache, visual_pos_masks=visual_pos_masks,
                                deepstack_visual_embeds=list(deepstack))


def add_deepstack(hidden: torch.Tensor, visual_pos_masks: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
    """``Qwen3VLTextModel._deepstack_process``: ``feature`` (rows in mask order) added to the hidden states
    at the ``[batch, seq]`` mask's positions, in the hidden states' dtype; a new tensor."""
    mask = visual_pos_masks.to(hidden.device)
    out = hidden.clone()
    out[mask, :] = hidden[mask, :] + feature.to(hidden.device, hidden.dtype)
    return out


def add_deepstack_at(hidden: torch.Tensor, where: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
    """:func:`add_deepstack` for rows that share one layout: ``where`` holds the image-token positions of
    every row, ``feature`` their rows row by row (the boolean mask's order). The same additions, without
    the boolean indexing's host synchronisation."""
    batch = hidden.shape[0]
    picked = hidden.index_select(1, where)
    added = picked + feature.to(hidden.device, hidden.dtype).view(batch, where.numel(), -1)
    return hidden.index_copy(1, where, added)
