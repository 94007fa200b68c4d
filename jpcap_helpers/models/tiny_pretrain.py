"""Pretraining of the offline tiny Qwen2-VL, so that the demo adapts a *pretrained* base as the real run
does (issue 15): before the demo the tiny model is fully trained (fp32, every weight incl. the ViT and
the projector, no LoRA) on a different captioning task of the toy world — fresh scenes, captions in
:data:`~jpcap_helpers.data.toy.PRETRAIN_TEMPLATES` (tags and plain sentences, neither STAIR's nor YJ's
phrasing). Zero-shot on jp-shapes it then names shapes and colours in the wrong style: weak, not zero.

A small loop of its own (transformers + :mod:`..data` only): the models floor must not import the
trainer. Cached in the tiny model's folder under a stamp whose fingerprint covers everything it depends
on; any change rebuilds it. A run killed half-way leaves a stamp that does not match: rebuilt next time.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from ..data.toy import (
    DEFAULT_IMAGE_SIZES,
    PRETRAIN_CAPTIONS_PER_IMAGE,
    PRETRAIN_STREAM,
    PRETRAIN_TEMPLATES,
    pretrain_items,
)
from ..io import atomic_write_json
from .registry import CAPTION_PROMPT_JA

__all__ = ["PRETRAIN_WEIGHT_DECAY", "PRETRAIN_WARMUP_RATIO", "PRETRAIN_MAX_GRAD_NORM", "STAMP_FILE",
           "architecture", "pretrain_fingerprint", "read_stamp", "pretrain_tiny_model"]

PRETRAIN_WEIGHT_DECAY = 0.01
PRETRAIN_WARMUP_RATIO = 0.05     # linear warm-up, then cosine to 0
PRETRAIN_MAX_GRAD_NORM = 1.0
PRETRAIN_VERSION = 1             # bump when the loop or the data recipe changes: cached bases rebuild
STAMP_FILE = "jpcap_tiny.json"
_HEADER = "<|im_start|>assistant\n"
_END = "<|im_end|>"


def architecture(spec: Any) -> dict:
    """The architecture keys of ``model.tiny`` (without the ``pretrain_*`` keys)."""
    return {k: v for k, v in dataclasses.asdict(spec).items() if not k.startswith("pretrain_")}


def pretrain_fingerprint(spec: Any, caption_texts: Sequence[str], min_pixels: int, max_pixels: int,
                         image_sizes: Sequence[Sequence[int]] = DEFAULT_IMAGE_SIZES) -> str:
    """12 hex chars over what the pretrained base depends on: architecture and seed, pretraining
    settings and recipe constants, templates, image sizes, pixel limits and the jp-shapes captions the
    tokenizer learns (the pretraining captions follow from templates, seed, sizes and image count)."""
    blob = [dataclasses.asdict(spec), min_pixels, max_pixels, sorted(set(caption_texts)),
            [list(s) for s in image_sizes], list(PRETRAIN_TEMPLATES), PRETRAIN_STREAM, PRETRAIN_CAPTIONS_PER_IMAGE,
            PRETRAIN_WEIGHT_DECAY, PRETRAIN_WARMUP_RATIO, PRETRAIN_MAX_GRAD_NORM, PRETRAIN_VERSION, "pretrained"]
    return hashlib.sha256(json.dumps(blob, ensure_ascii=False).encode()).hexdigest()[:12]


def read_stamp(model_dir: str | Path) -> dict:
    """The tiny model's stamp (``jpcap_tiny.json``: fingerprint, spec, pretraining record); {} when absent."""
    path = Path(model_dir) / STAMP_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}


def _labels(input_ids: Any, attention_mask: Any, header_ids: list[int], end_id: int) -> Any:
    """Targets = the caption tokens and ``<|im_end|>`` after the last assistant header; the rest -100."""
    import torch

    labels = torch.full_like(input_ids, -100)
    h = len(header_ids)
    for row in range(input_ids.shape[0]):
        ids, live = input_ids[row].tolist(), attention_mask[row].tolist()
        start = next(p + h for p in range(len(ids) - h, -1, -1) if ids[p:p + h] == header_ids and all(live[p:p + h]))
        end = ids.index(end_id, start)
        labels[row, start:end + 1] = input_ids[row, start:end + 1]
    return labels


def _collate(processor: Any, samples: Sequence[dict], header_ids: list[int], end_id: int) -> dict:
    """Model inputs and labels for ``{"image", "caption"}`` samples, through the chat template."""
    texts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": CAPTION_PROMPT_JA}]},
         {"role": "assistant", "content": [{"type": "text", "text": s["caption"]}]}], tokenize=False)
        for s in samples]
    batch = dict(processor(text=texts, images=[s["image"] for s in samples], padding=True,
                           padding_side="right", return_tensors="pt"))
    batch["labels"] = _labels(batch["input_ids"], batch["attention_mask"], header_ids, end_id)
    return batch


def _lr_factor(step: int, steps: int) -> float:
    """Linear warm-up over :data:`PRETRAIN_WARMUP_RATIO` of the steps, then cosine to 0."""
    warm = max(1, int(steps * PRETRAIN_WARMUP_RATIO))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, steps - warm))))


def pretrain_tiny_model(out_dir: str | Path, caption_texts: list[str], spec: Any, min_pixels: int = 56 * 56,
                        max_pixels: int = 448 * 448, image_sizes: Sequence[Sequence[int]] = DEFAULT_IMAGE_SIZES,
                        overwrite: bool = False, log: Optional[Callable[[str], None]] = print) -> Path:
    """Build the tiny model in ``out_dir`` and pretrain it (``spec.pretrain_*``), or reuse it when its
    stamp's fingerprint matches. ``caption_texts``: the jp-shapes captions (the tokenizer learns them
    together with the pretraining captions). Returns ``out_dir``."""
    import numpy as np
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .tiny import build_tiny_model

    out_dir = Path(out_dir)
    fingerprint = pretrain_fingerprint(spec, caption_texts, min_pixels, max_pixels, image_sizes)
    if not overwrite and read_stamp(out_dir).get("fingerprint") == fingerprint:
        return out_dir
    say = log or (lambda _msg: None)
    t0 = time.time()
    items = pretrain_items(spec.pretrain_images, spec.seed, image_sizes)
    build_tiny_model(out_dir, list(caption_texts) + [it["caption"] for it in items], spec, min_pixels, max_pixels,
                     overwrite=True)
    model = AutoModelForImageTextToText.from_pretrained(out_dir, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(out_dir, size={"shortest_edge": min_pixels, "longest_edge": max_pixels})
    tok = processor.tokenizer
    header_ids, end_id = tok.encode(_HEADER, add_special_tokens=False), tok.convert_tokens_to_ids(_END)
    steps, bs = spec.pretrain_steps, spec.pretrain_batch_size
    say(f"pretraining the tiny base: {steps} steps × {bs} of {len(items)} captions on {spec.pretrain_images} "
        f"fresh scenes (every weight, fp32, lr {spec.pretrain_lr:g}) — cached in {out_dir}")
    torch.manual_seed(spec.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.pretrain_lr, weight_decay=PRETRAIN_WEIGHT_DECAY)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, steps))
    model.train()
    losses: dict[int, float] = {}
    t_train = time.time()
    for step in range(steps):
        epoch, pos = divmod(step * bs, len(items))
        order = np.random.default_rng([spec.seed, epoch]).permutation(len(items))
        idx = order[pos:pos + bs]
        if len(idx) < bs:     # the epoch's tail: a full batch from its start instead
            idx = order[:bs]
        loss = model(**_collate(processor, [items[i] for i in idx], header_ids, end_id), use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), PRETRAIN_MAX_GRAD_NORM)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            losses[step] = round(float(loss.detach()), 4)
            say(f"  step {step + 1}/{steps}: loss {losses[step]:.3f} ({time.time() - t_train:.0f} s)")
    model.eval()
    model.save_pretrained(out_dir)
    seconds = time.time() - t0
    atomic_write_json(out_dir / STAMP_FILE, {
        "fingerprint": fingerprint, "spec": dataclasses.asdict(spec),
        "n_parameters": sum(p.numel() for p in model.parameters()), "vocab_size": len(tok),
        "pretrain": {"steps": steps, "batch_size": bs, "learning_rate": spec.pretrain_lr,
                     "weight_decay": PRETRAIN_WEIGHT_DECAY, "warmup_ratio": PRETRAIN_WARMUP_RATIO,
                     "max_grad_norm": PRETRAIN_MAX_GRAD_NORM, "images": spec.pretrain_images, "pairs": len(items),
                     "templates": list(PRETRAIN_TEMPLATES), "examples": [it["caption"] for it in items[:4]],
                     "losses": losses, "seconds": round(seconds, 1), "version": PRETRAIN_VERSION}})
    say(f"pretrained in {seconds:.0f} s: loss {losses.get(0, float('nan')):.2f} → {losses.get(steps - 1, float('nan')):.2f}")
    return out_dir
