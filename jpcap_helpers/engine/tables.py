"""Notebook views of predictions: zero-shot vs fine-tuned captions, predictions next to references,
and (image, text) pairs for ``reports.image_grid``."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Optional

from .. import io as jio
from ..models import ModelError, resolve
from .images import resolve_image
from .runs import FINETUNED_SUFFIX, prediction_path

__all__ = ["before_after_table", "sample_table", "sample_items"]


def before_after_table(params: Any, split: str = "test", n: int = 8) -> Any:
    """Zero-shot vs fine-tuned caption of the same images, with a reference, as a DataFrame."""
    import pandas as pd

    key = params.model.name
    before = prediction_path(params, key, split)
    after = prediction_path(params, key + FINETUNED_SUFFIX, split)
    refs = Path(params.processed_dir) / f"{split}.jsonl"
    if not (before.exists() and after.exists() and refs.exists()):
        return pd.DataFrame()
    b = {r["image_id"]: r.get("caption", "") for r in jio.read_jsonl(before, tolerate_partial_last=True)}
    a = {r["image_id"]: r.get("caption", "") for r in jio.read_jsonl(after, tolerate_partial_last=True)}
    rows = []
    for rec in jio.read_jsonl(refs):
        if rec["image_id"] in a and rec["image_id"] in b:
            rows.append({"image_id": rec["image_id"], "zero-shot": b[rec["image_id"]],
                         "fine-tuned": a[rec["image_id"]], "reference": rec["captions"][0]})
        if len(rows) >= n:
            break
    return pd.DataFrame(rows)


def sample_table(pred_path: str | Path, split_path: str | Path, n: int = 8, seed: Optional[int] = None) -> Any:
    """``n`` predictions next to their image and first reference caption (file order, or a seeded
    random sample): columns image_id, file_name, prediction, reference, error."""
    import pandas as pd

    preds = list(jio.read_jsonl(pred_path, tolerate_partial_last=True))
    refs = {r["image_id"]: r for r in jio.read_jsonl(split_path)}
    if seed is not None:
        preds = random.Random(seed).sample(preds, min(n, len(preds)))
    rows = []
    for p in preds[:n]:
        ref = refs.get(p["image_id"], {})
        caps = ref.get("captions") or []
        rows.append({"image_id": p["image_id"], "file_name": ref.get("file_name", ""),
                     "prediction": p.get("caption", ""), "reference": caps[0] if caps else "",
                     "error": p.get("error", "")})
    return pd.DataFrame(rows, columns=["image_id", "file_name", "prediction", "reference", "error"])


def sample_items(params: Any, model: str, split: str, n: int = 8) -> list[tuple[Path, str]]:
    """``(image path, "prediction / reference")`` pairs for ``reports.image_grid``, from the run's
    ``predictions/<model>__<split>.jsonl``; empty when that file or the split file does not exist."""
    try:
        key = resolve(model).key
    except ModelError:
        key = model
    pred = prediction_path(params, key, split)
    refs = Path(params.processed_dir) / f"{split}.jsonl"
    if not pred.exists() or not refs.exists():
        return []
    table = sample_table(pred, refs, n=n)
    items = []
    for row in table.itertuples(index=False):
        if not row.file_name:  # a prediction for an image the split file does not list
            continue
        shown = row.prediction if row.prediction else (f"[error: {row.error}]" if row.error else "(empty)")
        items.append((resolve_image(params.images_dir, row.file_name), f"{shown} / {row.reference}"))
    return items
