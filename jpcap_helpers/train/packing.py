"""Caption packing (``train.pack_captions``): one training row per image holding all (or ``k``) of its
captions behind a single image + prompt prefix.

Row layout: ``[prefix | caption 1 | caption 2 | ... | padding]``. The prefix is the chat up to and
including ``<|im_start|>assistant\\n`` (image tokens included); each caption segment holds its caption
tokens (its closing ``<|im_end|>`` is only a target, never an input: nothing reads its hidden state).
A block mask lets every prefix token see the prefix causally and every caption token see the prefix and
its own caption causally: no caption sees another. Caption tokens get the positions they would have
alone (text positions continue from the prefix's last position, for every caption), so each caption's
logits equal those of its own unpacked row. Targets are explicit ``(row position, token)`` pairs: the
first token of every caption is predicted from the prefix's last position.
"""
from __future__ import annotations

import inspect
import math
import os
import warnings
from typing import Any, Optional, Sequence

import numpy as np

from .batches import (
    ASSISTANT_HEADER,
    END_TOKEN,
    IGNORE_INDEX,
    PAD_MULTIPLE,
    PairDataset,
    _placeholder_image,
    chat_messages,
)
from .errors import TrainError
from .positions import packed_positions, rope_positions

__all__ = ["PACKED_KEY", "is_packed", "target_count", "group_by_image", "PackedSamples", "PackedDataset",
           "PackedCollator", "pack_token_rows", "packed_attention_mask", "packed_position_ids"]

PACKED_KEY = "segment_ids"      # a batch holding it is packed


def is_packed(batch: dict) -> bool:
    return PACKED_KEY in batch


def target_count(batch: dict) -> int:
    """Target tokens of a micro-batch, packed or not."""
    if is_packed(batch):
        return int(batch["target_ids"].numel())
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


# ---------------------------------------------------------------------------------------------
# samples: images with their captions, per epoch
# ---------------------------------------------------------------------------------------------

def group_by_image(pairs: Sequence[dict]) -> list[list[int]]:
    """Pair indices grouped by ``image_id``, groups in order of first appearance, pairs in file order."""
    groups: dict[Any, list[int]] = {}
    for i, p in enumerate(pairs):
        groups.setdefault(p["image_id"], []).append(i)
    return list(groups.values())


class PackedSamples:
    """The packed samples of each epoch. ``captions_per_image`` 0: one sample per image with all its
    captions; k > 0: each image's captions shuffled (a function of seed and epoch) and cut into chunks of
    at most k, one sample per chunk. Either way an epoch holds every caption exactly once, and the number
    of samples is the same in every epoch (so the step count and the epoch order are fixed)."""

    def __init__(self, pairs: Sequence[dict], captions_per_image: int, seed: int):
        self.groups, self.k, self.seed = group_by_image(pairs), int(captions_per_image), int(seed)

    def __len__(self) -> int:
        if not self.k:
            return len(self.groups)
        return sum(math.ceil(len(g) / self.k) for g in self.groups)

    def for_epoch(self, epoch: int) -> list[list[int]]:
        if not self.k:
            return self.groups
        rng = np.random.default_rng([self.seed, int(epoch), 1])
        out = []
        for g in self.groups:
            shuffled = [g[int(i)] for i in rng.permutation(len(g))]
            out.extend(shuffled[j:j + self.k] for j in range(0, len(shuffled), self.k))
        return out


class PackedDataset:
    """``{"image", "captions", "image_id"}`` per packed sample (``missing`` = file name when the image
    file has gone missing: the collator then trains nothing from the sample)."""

    def __init__(self, pairs: list[dict], images_dir: str | os.PathLike, samples: list[list[int]]):
        self.pairs, self.samples = pairs, samples
        self.images = PairDataset(pairs, images_dir)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        idx = self.samples[i]
        item = self.images[idx[0]]
        item.pop("caption")
        item["captions"] = [self.pairs[j]["caption"] for j in idx]
        return item


# ---------------------------------------------------------------------------------------------
# the collator
# ---------------------------------------------------------------------------------------------

class PackedCollator:
    """Packed batches from ``{"image", "captions"}`` samples: ``input_ids``, ``attention_mask`` (real
    tokens), ``segment_ids`` (0 prefix, j caption j, -1 padding), ``caption_pos`` (index inside the
    caption), ``target_index`` (flat row position predicting each target), ``target_ids``, the rotary
    ``position_ids`` (:mod:`.positions`; Qwen-VL processors) and the processor's image tensors. Tokens are exactly those of :class:`~.batches.CaptionCollator`'s rows; rows
    are right-padded to a multiple of ``pad_multiple`` tokens (:data:`~.batches.PAD_MULTIPLE`)."""

    def __init__(self, processor: Any, prompt: str, pad_multiple: int = PAD_MULTIPLE):
        self.processor, self.prompt, self.pad_multiple = processor, prompt, pad_multiple
        self.merge_size = getattr(getattr(processor, "image_processor", None), "merge_size", None)
        tok = processor.tokenizer
        self.header_ids = tok.encode(ASSISTANT_HEADER, add_special_tokens=False)
        self.end_id = tok.convert_tokens_to_ids(END_TOKEN)
        if not self.header_ids or self.end_id is None or self.end_id == tok.unk_token_id:
            raise TrainError(f"the tokenizer has no {END_TOKEN} / assistant header: not a Qwen chat tokenizer")
        apply = processor.apply_chat_template
        self.prefix_text = apply(chat_messages(prompt), tokenize=False, add_generation_prompt=True)
        self.prefix_ids = tok.encode(self.prefix_text, add_special_tokens=False)
        if self.prefix_ids[-len(self.header_ids):] != self.header_ids:
            raise TrainError(f"the generation prompt does not end with {ASSISTANT_HEADER!r}: cannot pack captions")

    def caption_ids(self, caption: str) -> list[int]:
        """The caption's tokens and its closing ``<|im_end|>``, cut from the tokenized full chat (so
        they are the unpacked row's tokens); the chat before them must be the shared prefix."""
        text = self.processor.apply_chat_template(chat_messages(self.prompt, caption), tokenize=False)
        ids = self.processor.tokenizer.encode(text, add_special_tokens=False)
        start = len(self.prefix_ids)
        if ids[:start] != self.prefix_ids:
            raise TrainError("the tokenized chat does not start with the generation prompt's tokens: "
                             "cannot pack captions (train.pack_captions: false)")
        try:
            end = ids.index(self.end_id, start)
        except ValueError:
            raise TrainError(f"a caption has no closing {END_TOKEN}") from None
        return ids[start:end + 1]

    def __call__(self, samples: Sequence[dict]) -> dict:
        missing = [row for row, s in enumerate(samples) if s.get("image") is None and "missing" in s]
        images = [_placeholder_image() if row in missing else s["image"] for row, s in enumerate(samples)]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*min_pixels.*max_pixels.*", category=FutureWarning)
            prefix = dict(self.processor(text=[self.prefix_text] * len(samples), images=images, padding=True,
                                         padding_side="right", return_tensors="pt"))
        prefixes, prefix_types, captions = [], [], []
        for row, s in enumerate(samples):
            n = int(prefix["attention_mask"][row].sum())
            prefixes.append(prefix["input_ids"][row, :n].tolist())
            prefix_types.append(prefix["mm_token_type_ids"][row, :n].tolist() if "mm_token_type_ids" in prefix
                                else [0] * n)
            captions.append([] if row in missing else [self.caption_ids(c) for c in s["captions"]])
        batch = pack_token_rows(prefixes, prefix_types, captions, self.processor.tokenizer.pad_token_id or 0,
                                self.pad_multiple)
        batch.update(pixel_values=prefix["pixel_values"], image_grid_thw=prefix["image_grid_thw"])
        if "mm_token_type_ids" in prefix:
            batch["mm_token_type_ids"] = batch["mm_token_type_ids"].to(prefix["mm_token_type_ids"].dtype)
            if self.merge_size:
                prefix_pos = rope_positions(batch["input_ids"], batch["mm_token_type_ids"], batch["image_grid_thw"],
                                            self.merge_size, attention_mask=batch["segment_ids"] == 0)
                batch["position_ids"] = packed_positions(prefix_pos, batch["segment_ids"], batch["caption_pos"])
        else:
            del batch["mm_token_type_ids"]
        if missing:
            batch["missing_images"] = [samples[row]["missing"] for row in missing
                                       for _ in range(max(1, len(samples[row]["captions"])))]
        return batch


def pack_token_rows(prefixes: Sequence[list[int]], prefix_types: Sequence[list[int]],
                    captions: Sequence[Sequence[list[int]]], pad_id: int, pad_multiple: int = 1) -> dict:
    """The packed token layout (see the module docstring) from each row's prefix ids, their modality
    types (0 text, 1 image) and its captions' ids (each with its closing ``<|im_end|>``), right-padded
    (to a multiple of ``pad_multiple``):
    ``input_ids``, ``attention_mask``, ``segment_ids``, ``caption_pos``, ``mm_token_type_ids``,
    ``target_index``, ``target_ids``, ``n_captions``."""
    import torch

    rows, segs, cpos, types, targets = [], [], [], [], []
    for row, (ids, mm, caps) in enumerate(zip(prefixes, prefix_types, captions)):
        n = len(ids)
        ids, mm, seg, pos = list(ids), list(mm), [0] * n, [0] * n
        for j, cap in enumerate(caps, start=1):
            first = len(ids)
            targets.append((row, n - 1, cap[0]))
            targets.extend((row, first + t - 1, cap[t]) for t in range(1, len(cap)))
            ids += cap[:-1]
            seg += [j] * (len(cap) - 1)
            pos += list(range(len(cap) - 1))
            mm += [0] * (len(cap) - 1)
        rows.append(ids)
        segs.append(seg)
        cpos.append(pos)
        types.append(mm)
    length = -(-max(len(r) for r in rows) // pad_multiple) * pad_multiple

    def padded(values, fill):
        return torch.tensor([v + [fill] * (length - len(v)) for v in values], dtype=torch.long)

    batch = {"input_ids": padded(rows, pad_id), "segment_ids": padded(segs, -1), "caption_pos": padded(cpos, 0),
             "mm_token_type_ids": padded(types, 0)}
    batch["attention_mask"] = (batch["segment_ids"] >= 0).long()
    batch["target_index"] = torch.tensor([r * length + p for r, p, _ in targets], dtype=torch.long)
    batch["target_ids"] = torch.tensor([t for _, _, t in targets], dtype=torch.long)
    batch["n_captions"] = torch.tensor(sum(len(c) for c in captions))
    return batch


# ---------------------------------------------------------------------------------------------
# the block mask (on the model's device, inside the loss) and the positions' reference
# ---------------------------------------------------------------------------------------------

def packed_attention_mask(segment_ids: Any, float_dtype: Optional[Any] = None) -> Any:
    """``[batch, 1, L, L]`` mask: True where a query may attend a key — the prefix causally, a caption the
    prefix and itself causally, padding only itself (no empty row). ``float_dtype``: the additive form
    (0 / dtype min) for the eager attention."""
    import torch

    seg = segment_ids
    length = seg.shape[1]
    q, k = seg[:, :, None], seg[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool, device=seg.device).tril()
    allowed = ((k == 0) | (k == q)) & (k >= 0) & causal
    allowed |= torch.eye(length, dtype=torch.bool, device=seg.device)
    allowed = allowed[:, None]
    if float_dtype is None:
        return allowed
    return torch.zeros(allowed.shape, dtype=float_dtype, device=seg.device).masked_fill(
        ~allowed, torch.finfo(float_dtype).min)


def packed_position_ids(base: Any, batch: dict) -> Any:
    """``[3, batch, L]`` rotary positions from the model's own ``get_rope_index`` (3-D for the prefix);
    each caption's text positions continue from the prefix's last position, as in its unpacked row.
    The collator's ``position_ids`` (:mod:`.positions`, on the CPU) are these; this is the reference."""
    inner = base.model
    seg = batch["segment_ids"]
    kwargs = dict(image_grid_thw=batch["image_grid_thw"], attention_mask=(seg == 0).long())
    if "mm_token_type_ids" in inspect.signature(inner.get_rope_index).parameters:
        kwargs["mm_token_type_ids"] = batch["mm_token_type_ids"]
    pos, _ = inner.get_rope_index(batch["input_ids"], **kwargs)
    return packed_positions(pos, seg, batch["caption_pos"])
