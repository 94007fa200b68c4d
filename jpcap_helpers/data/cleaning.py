"""Caption cleaning: the same normalisation and token truncation for every split and source."""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from ..text import NormalizeStats, normalize_caption, truncate_to_tokens
from .records import DataError, ImageRecord

DROP_EMPTY_AFTER_NORMALIZE = "empty_after_normalize"
DROP_EMPTY_AFTER_TRUNCATE = "empty_after_truncate"


def resolve_tokenizer(tokenizer: Any) -> Any:
    """``tokenizer`` itself, or one loaded from a local folder (str/Path); None stays None."""
    if tokenizer is None or not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    folder = Path(tokenizer)
    if not folder.is_dir():
        raise DataError(f"{folder}: tokenizer folder not found; pass a folder saved with save_pretrained")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - name the folder, whatever transformers raised
        raise DataError(f"{folder}: cannot load a tokenizer from it ({type(e).__name__}: {e})") from None


def tokenizer_name(tokenizer: Any) -> str | None:
    if tokenizer is None:
        return None
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def clean_captions(records: list[ImageRecord], tokenizer: Any = None, max_caption_tokens: int = 64) -> dict:
    """Normalise (``text.normalize_caption``) and, with a tokenizer, truncate to
    ``max_caption_tokens`` (``text.truncate_to_tokens``) every caption, **in place**.

    The same steps apply to every split and source. Captions empty after normalising are dropped,
    images left without captions are removed from ``records``. Returns JSON-ready counts: per
    normalisation step, truncations, drops, with a few before/after examples.
    """
    tokenizer = resolve_tokenizer(tokenizer)
    total = NormalizeStats()
    examples: dict[str, list] = {}
    dropped_items: list[dict] = []
    dropped: Counter = Counter()
    truncated = 0
    captions_in = 0
    images_dropped: list[int] = []
    kept_records = []

    def example(bucket: dict, key: str, item: dict) -> None:
        lst = bucket.setdefault(key, [])
        if len(lst) < 5:
            lst.append(item)

    for rec in records:
        new_caps = []
        for cap in rec.captions:
            captions_in += 1
            one = NormalizeStats()
            text = normalize_caption(cap, one)
            for step in NormalizeStats.STEPS:
                if getattr(one, step):
                    example(examples, step, {"image_id": rec.image_id, "before": cap, "after": text})
            total.merge(one)
            if not text:
                dropped[DROP_EMPTY_AFTER_NORMALIZE] += 1
                dropped_items.append({"image_id": rec.image_id, "caption": cap, "reason": DROP_EMPTY_AFTER_NORMALIZE})
                continue
            if tokenizer is not None:
                short, was_cut = truncate_to_tokens(text, tokenizer, max_caption_tokens)
                if was_cut:
                    truncated += 1
                    short = short.strip()
                    example(examples, "truncated", {"image_id": rec.image_id, "before": text, "after": short})
                    if not short:
                        dropped[DROP_EMPTY_AFTER_TRUNCATE] += 1
                        dropped_items.append({"image_id": rec.image_id, "caption": cap,
                                              "reason": DROP_EMPTY_AFTER_TRUNCATE})
                        continue
                    text = short
            new_caps.append(text)
        rec.captions = new_caps
        if new_caps:
            kept_records.append(rec)
        else:
            images_dropped.append(rec.image_id)
    records[:] = kept_records
    dup_within = sum(len(r.captions) - len(set(r.captions)) for r in records)
    return {
        "captions_in": captions_in,
        "captions_out": sum(len(r.captions) for r in records),
        "normalize": total.as_dict(),
        "tokenizer": tokenizer_name(tokenizer),
        "max_caption_tokens": max_caption_tokens if tokenizer is not None else None,
        "truncated": truncated,
        "dropped": dict(sorted(dropped.items())),
        "dropped_captions": dropped_items,                # every one (normally a handful)
        "images_dropped_no_captions": len(images_dropped),
        "images_dropped_ids": images_dropped,
        "duplicate_captions_within_image": dup_within,   # counted only, kept
        "examples": examples,
    }

