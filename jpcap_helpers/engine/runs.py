"""Captioning runs over a params file's splits: every zero-shot model (:func:`run_zero_shot`), the
fine-tuned model (:func:`run_finetuned`), the constant-caption floor (:func:`write_constant_baseline`),
with the predictions' paths and their ``.meta.json`` provenance."""
from __future__ import annotations

import gc
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from .. import io as jio
from ..io import run_lock
from ..models import ModelEntry, contamination_flag, load_model
from ..text import normalize_caption
from .options import EngineOptions
from .pipeline import caption_records, error_text

__all__ = ["FINETUNED_SUFFIX", "CONSTANT_SYSTEM", "prediction_path", "write_prediction_meta", "split_files",
           "run_zero_shot", "run_finetuned", "write_constant_baseline"]

FINETUNED_SUFFIX = "+ft"
CONSTANT_SYSTEM = "constant-caption"


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+_-]+", "_", name).strip("_") or "model"


def prediction_path(params: Any, model_key: str, split: str) -> Path:
    """``<run_dir>/predictions/<model>__<split>.jsonl``."""
    return Path(params.run_dir) / "predictions" / f"{_safe_name(model_key)}__{split}.jsonl"


def write_prediction_meta(pred_path: str | Path, entry: ModelEntry, summary: Mapping[str, Any], *,
                          revision: Optional[str] = None, adapter: str = "",
                          prompt: Optional[str] = None) -> Path:
    """Write ``<pred>.meta.json`` beside a predictions file (read by ``evaluate.evaluate_run``): model
    id, revision, adapter, peak GPU memory (the largest seen over resumed runs), contamination flag,
    generation settings and the last run's summary."""
    meta_path = Path(pred_path).with_suffix(".meta.json")
    old = {}
    if meta_path.exists():
        try:
            old = json.loads(meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            old = {}
    peaks = [v for v in (old.get("peak_gpu_gib"), summary.get("peak_gpu_gib")) if isinstance(v, (int, float))]
    meta = {
        "model": entry.key,
        "model_id": entry.key if entry.hub_id.startswith("(") else entry.hub_id,
        "revision": revision or summary.get("commit") or "",
        "adapter": adapter,
        "peak_gpu_gib": max(peaks) if peaks else None,
        "trained_on_stair": entry.trained_on_stair,
        "contamination": contamination_flag(entry),
        "prompt": prompt if prompt is not None else entry.prompt,
        "generation": {k: summary.get(k) for k in ("batch_size", "num_beams", "max_new_tokens", "constraints")},
        "last_run": dict(summary),
    }
    old_cons = (old.get("generation") or {}).get("constraints")
    if old and old_cons != summary.get("constraints") and summary.get("n_skipped_existing"):
        # resumed under other constraints: the file mixes captions of two settings
        meta["generation"]["constraints_mixed"] = True
        print(f"{pred_path}: resumed with other generation.constraints than its earlier rows ({old_cons} → "
              f"{summary.get('constraints')}): delete the file to caption every image under one setting")
    elif old.get("generation", {}).get("constraints_mixed"):
        meta["generation"]["constraints_mixed"] = True
    return jio.atomic_write_json(meta_path, meta)


def split_files(params: Any, splits: Sequence[str]) -> dict[str, Path]:
    """``{split: <processed_dir>/<split>.jsonl}`` for the splits that exist; the others are skipped
    with a printed note."""
    files = {}
    for split in splits:
        path = Path(params.processed_dir) / f"{split}.jsonl"
        if path.is_file():
            files[split] = path
        else:
            print(f"split {split!r} skipped: {path} does not exist (run the data notebook first)")
    return files


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _caption_splits(params: Any, model: Any, processor: Any, entry: ModelEntry, system: str,
                    files: Mapping[str, Path], max_images: Optional[int], adapter: str = "",
                    options: EngineOptions = EngineOptions()) -> list[dict]:
    """Caption each split into ``predictions/<system>__<split>.jsonl``; one summary row per split."""
    rows = []
    for split, path in files.items():
        records = list(jio.read_jsonl(path))
        if max_images is not None:
            records = records[:max_images]
        out = prediction_path(params, system, split)
        summary = caption_records(
            model, processor, entry, records, params.images_dir, out,
            batch_size=params.generation.batch_size, max_new_tokens=params.generation.max_new_tokens,
            num_beams=params.generation.num_beams, prompt=params.generation.prompt,
            decoder=params.generation.decoder, extra={"split": split}, options=options,
            constraints=params.generation.constraints)
        write_prediction_meta(out, entry, summary, prompt=params.generation.prompt,
                              revision=params.model.revision or entry.revision or summary.get("commit"),
                              adapter=adapter)
        rows.append({"model": system, "split": split, "hub_id": entry.hub_id,
                     "contamination": contamination_flag(entry), **summary,
                     "pred_path": str(out), "split_path": str(path)})
    return rows


def run_zero_shot(params: Any, splits: Optional[Sequence[str]] = None, models: Optional[Sequence[str]] = None,
                  max_images: Optional[int] = None, options: EngineOptions = EngineOptions()) -> Any:
    """Caption every split with every model (defaults: ``params.zero_shot``) into
    ``<run_dir>/predictions/<model>__<split>.jsonl``; one summary row per (model, split), as a DataFrame.

    A split whose ``<processed_dir>/<split>.jsonl`` is missing is skipped with a printed note; a
    model that fails to load gets a row with its ``error`` and the run goes on. Holds the run
    folder's lock (``io.run_lock``).
    """
    import pandas as pd

    splits = list(splits if splits is not None else params.zero_shot.splits)
    names = list(models if models is not None else params.zero_shot.models)
    max_images = max_images if max_images is not None else params.zero_shot.max_images
    rows = []
    with run_lock(params.run_dir, "caption"):
        files = split_files(params, splits)
        for name in names:
            if not files:
                break
            try:
                model, processor, entry = load_model(params, name)
            except Exception as exc:
                print(f"zero-shot: model {name!r} skipped: {error_text(exc)}")
                rows.append({"model": name, "error": error_text(exc)})
                continue
            try:
                rows += _caption_splits(params, model, processor, entry, entry.key, files, max_images,
                                        options=options)
            finally:  # free the model before the next one loads
                del model, processor
                _free_memory()
    return pd.DataFrame(rows)


def run_finetuned(params: Any, adapter: str | Path, splits: Optional[Sequence[str]] = None,
                  max_images: Optional[int] = None, options: EngineOptions = EngineOptions()) -> Any:
    """Caption the splits (defaults: ``evaluate.splits``, ``evaluate.max_images`` per split) with
    ``params.model`` + the trained adapter into ``predictions/<model>+ft__<split>.jsonl`` (the
    fine-tuned rows of 04's table). The base loads in 4 bit as the adapter was trained (its
    ``jpcap_train.json``), else per ``model.load_in_4bit``. Holds the run folder's lock."""
    import pandas as pd

    splits = list(splits if splits is not None else params.evaluate.splits)
    max_images = max_images if max_images is not None else params.evaluate.max_images
    with run_lock(params.run_dir, "caption"):
        files = split_files(params, splits)
        model, processor, entry = load_model(params, adapter=str(adapter))
        try:
            rows = _caption_splits(params, model, processor, entry, entry.key + FINETUNED_SUFFIX, files,
                                   max_images, adapter=str(adapter), options=options)
        finally:
            del model, processor
            _free_memory()
    return pd.DataFrame(rows)


def write_constant_baseline(params: Any, splits: Optional[Sequence[str]] = None) -> str:
    """The floor to judge learning against: the most frequent training caption, predicted for every
    image of each split (``predictions/constant-caption__<split>.jsonl``; default splits:
    ``zero_shot.splits``). On templated data such as jp-shapes it scores well above zero; a model
    that has learned must beat it. Returns the caption."""
    pairs = Path(params.processed_dir) / "train_pairs.jsonl"
    counts = Counter(normalize_caption(r["caption"]) for r in jio.read_jsonl(pairs))
    caption = counts.most_common(1)[0][0]
    for split, path in split_files(params, list(splits if splits is not None else params.zero_shot.splits)).items():
        rows = [{"image_id": r["image_id"], "caption": caption, "model": CONSTANT_SYSTEM, "split": split}
                for r in jio.read_jsonl(path)]
        jio.atomic_write_jsonl(prediction_path(params, CONSTANT_SYSTEM, split), rows)
    return caption
