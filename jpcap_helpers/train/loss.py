"""The fast-path loss: the frozen ViT without autograd, the projector (with Qwen3-VL's deepstack mergers)
with it, the language model fed the image features directly, logits and cross-entropy only at caption
positions (docs/training.md)."""
from __future__ import annotations

import inspect
from typing import Any, Callable, Optional, Sequence

from ..models.deepstack import encoder_output, text_forward, tower_features
from .batches import IGNORE_INDEX
from .lora import causal_lm
from .packing import is_packed, packed_attention_mask, packed_position_ids

__all__ = ["visual_features", "language_forward", "caption_loss", "plain_loss", "make_loss_module"]


def visual_features(base: Any, pixel_values: Any, grid_thw: Any) -> tuple[Any, list[int], list[Any]]:
    """(projector outputs, image-token count per image, deepstack features): the vision tower's own
    forward, the frozen ViT building no autograd graph, the merger and — Qwen3-VL — the deepstack
    mergers with one where they train (:func:`~jpcap_helpers.models.deepstack.tower_features`)."""
    visual = base.model.visual
    vit_dtype = next(visual.patch_embed.parameters()).dtype
    # read before the tower is queued: read after it, the host would wait for the whole ViT before it
    # could queue the language model
    sizes = (grid_thw.prod(-1) // visual.spatial_merge_size ** 2).tolist()
    embeds, deepstack = tower_features(visual, pixel_values.to(vit_dtype), grid_thw)
    return embeds, sizes, deepstack


def language_forward(base: Any, batch: dict, embeds: Any, sizes: list[int],
                     use_mm_encoder_outputs: Optional[bool] = None, attention_mask: Any = None,
                     position_ids: Any = None, deepstack: Sequence[Any] = ()) -> Any:
    """The language model's forward with the image features in place of the image tokens (and, for
    Qwen3-VL, the ``deepstack`` features added after its first layers, by the model's own code).

    ``use_mm_encoder_outputs``: hand the features over as ``mm_encoder_outputs`` (transformers 5) or
    scatter them into the token embeddings (older 5.x); None decides from the installed transformers.
    ``attention_mask`` / ``position_ids`` replace the batch's 2-D mask and its positions (packed batches: a
    4-D block mask and explicit 3-D positions); without them the batch's ``position_ids`` (from the
    collator) are used, else the model computes its own.
    """
    inner = base.model
    if position_ids is None:
        position_ids = batch.get("position_ids")
    if use_mm_encoder_outputs is None:
        use_mm_encoder_outputs = "mm_encoder_outputs" in inspect.signature(inner.forward).parameters
    common = dict(input_ids=batch["input_ids"],
                  attention_mask=batch["attention_mask"] if attention_mask is None else attention_mask,
                  image_grid_thw=batch["image_grid_thw"], use_cache=False)
    if position_ids is not None:
        common["position_ids"] = position_ids
    if "mm_token_type_ids" in batch:
        common["mm_token_type_ids"] = batch["mm_token_type_ids"]
    if use_mm_encoder_outputs:
        return inner(mm_encoder_outputs={"image": encoder_output(embeds, sizes, deepstack)}, **common)
    ids = batch["input_ids"]
    tok_embeds = inner.get_input_embeddings()(ids)
    mask = (ids == base.config.image_token_id).unsqueeze(-1).expand_as(tok_embeds)
    tok_embeds = tok_embeds.masked_scatter(mask, embeds.to(tok_embeds.dtype))
    if deepstack:
        common.pop("input_ids")
        return text_forward(inner, tok_embeds, ids, deepstack, **common)
    return inner(inputs_embeds=tok_embeds, **common)


def caption_loss(model: Any, batch: dict, *, use_mm_encoder_outputs: Optional[bool] = None,
                 label_smoothing: float = 0.0) -> tuple[Any, Any]:
    """Fast-path loss: ``(sum of token cross-entropies, number of target tokens)``, for plain or packed
    batches (:mod:`.packing`: the same targets, so the same sum and count as the unpacked rows).

    The ViT runs without autograd, the projector with it; hidden states go through ``lm_head`` only
    at positions whose next token is a target, in fp32 for the cross-entropy. ``label_smoothing``
    (``train.label_smoothing``): the target distribution puts that mass uniformly over the vocabulary.
    """
    import torch
    import torch.nn.functional as F

    base = causal_lm(model)
    if getattr(base, "jpcap_cudagraphs", False):   # train.cudagraphs: the last forward's graph outputs are done
        torch.compiler.cudagraph_mark_step_begin()
    embeds, sizes, deepstack = visual_features(base, batch["pixel_values"], batch["image_grid_thw"])
    if is_packed(batch):
        eager = base.config._attn_implementation == "eager"
        mask = packed_attention_mask(batch["segment_ids"], embeds.dtype if eager else None)
        out = language_forward(base, batch, embeds, sizes, use_mm_encoder_outputs, attention_mask=mask,
                               position_ids=batch["position_ids"] if "position_ids" in batch
                               else packed_position_ids(base, batch), deepstack=deepstack)
        hidden = out.last_hidden_state.flatten(0, 1)[batch["target_index"]]
        logits = base.lm_head(hidden).float()
        targets = batch["target_ids"].to(logits.device)
        return (F.cross_entropy(logits, targets, reduction="sum", label_smoothing=label_smoothing),
                targets.new_tensor(targets.numel()))
    out = language_forward(base, batch, embeds, sizes, use_mm_encoder_outputs, deepstack=deepstack)
    hidden = out.last_hidden_state[:, :-1]
    targets = batch["labels"][:, 1:].to(hidden.device)
    sel = targets != IGNORE_INDEX
    logits = base.lm_head(hidden[sel]).float()
    return F.cross_entropy(logits, targets[sel], reduction="sum", label_smoothing=label_smoothing), sel.sum()


def plain_loss(model: Any, batch: dict) -> Any:
    """The reference: a full forward with ``labels`` (the transformers loss, mean over targets) and the
    model's own rotary positions (the collator's ``position_ids`` are left out); unpacked batches only
    (a packed batch has no ``labels``: use :func:`caption_loss`)."""
    if is_packed(batch):
        raise ValueError("plain_loss takes unpacked batches (train.pack_captions: false); caption_loss takes both")
    return model(**{k: v for k, v in batch.items() if k != "position_ids"}, use_cache=False).loss


def make_loss_module(peft_model: Any, loss: Callable[[Any, dict], tuple[Any, Any]] = caption_loss) -> Any:
    """A module whose ``forward(batch)`` is ``loss(model, batch)``, so DDP wraps one module."""
    import torch

    class LossModule(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, batch):
            return loss(self.model, batch)

    return LossModule(peft_model)
