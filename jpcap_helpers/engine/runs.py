"""Captioning runs over a params file's splits: every zero-shot model (:func:`run_zero_shot`), the
fine-tuned model (:func:`run_finetuned`), the constant-caption floor (:func:`write_constant_baseline`),
with the predictions' paths and their ``.meta.json`` provenance."""
from __future__ import annotations

import functools
import gc
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from .. import io as jio
from ..io import run_lock
from ..models import ModelEntry, contamination_flag, load_model, resolve
from ..models.loading import model_path, pinned_settings, runs_pinned
from ..models.pinned_env import env_root
from ..text import normalize_caption
from .grids import plan_grids
from .options import EngineOptions
from .pinned import caption_records_pinned
from .pipeline import caption_records, error_text, plan_batches
from .sharding import caption_sharded, process_group

__all__ = ["FINETUNED_SUFFIX", "CONSTANT_SYSTEM", "prediction_path", "write_prediction_meta", "split_files",
           "run_zero_shot", "run_finetuned", "caption_file", "write_constant_baseline"]

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
        "weights": summary.get("weights"),  # e.g. "nf4 dequantized to bfloat16, adapter merged"
        "peak_gpu_gib": max(peaks) if peaks else None,
        "trained_on_stair": entry.trained_on_stair,
        "contamination": contamination_flag(entry),
        "prompt": prompt if prompt is not None else entry.prompt,
        "generation": {k: summary.get(k) for k in ("batch_size", "num_beams", "max_new_tokens", "decoder",
                                                    "grid_buckets", "warmup", "constraints")},
        "card_generation": entry.card_generation,  # the model card's own settings (not used unless asked)
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
    old_buckets = (old.get("generation") or {}).get("grid_buckets") or 0
    if (old and old_buckets != (summary.get("grid_buckets") or 0) and summary.get("n_skipped_existing")) or \
            (old.get("generation") or {}).get("grid_buckets_mixed"):
        # resized images change captions: a file resumed under another grid_buckets mixes two settings
        meta["generation"]["grid_buckets_mixed"] = True
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


def _batch_planner(model: Any, processor: Any, entry: ModelEntry, images_dir: str | Path, gen: Any,
                   grids: Any) -> Callable[[list], list[list]]:
    """``plan(records) -> batches``: the engine's batches under ``gen`` (``params.generation``), which
    :func:`.sharding.caption_sharded` deals out whole."""
    return functools.partial(plan_batches, model, processor, entry, images_dir=images_dir,
                             batch_size=gen.batch_size, num_beams=gen.num_beams, decoder=gen.decoder, grids=grids)


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
        gen = params.generation
        grids = plan_grids(processor, records, params.images_dir, gen.grid_buckets)  # over the whole split

        def caption(shard: list, path: Path, planned: Optional[list] = None, split: str = split, gen: Any = gen,
                    grids: Any = grids) -> dict:
            return caption_records(
                model, processor, entry, shard, params.images_dir, path,
                batch_size=gen.batch_size, max_new_tokens=gen.max_new_tokens,
                num_beams=gen.num_beams, prompt=gen.prompt,
                decoder=gen.decoder, extra={"split": split}, options=options,
                constraints=gen.constraints, grid_buckets=gen.grid_buckets, grids=grids, warmup=gen.warmup,
                warmup_batches=planned)

        plan = _batch_planner(model, processor, entry, params.images_dir, gen, grids)
        summary = caption_sharded(caption, records, out, plan)  # one GPU, or whole batches per GPU under accelerate
        if process_group()[0] == 0:
            write_prediction_meta(out, entry, summary, prompt=params.generation.prompt,
                                  revision=params.model.revision or entry.revision or summary.get("commit"),
                                  adapter=adapter)
        rows.append({"model": system, "split": split, "hub_id": entry.hub_id,
                     "contamination": contamination_flag(entry), **summary,
                     "pred_path": str(out), "split_path": str(path)})
    return rows


def _warn_unconstrained(params: Any, entry: ModelEntry) -> None:
    c = params.generation.constraints
    if c.ban_scripts or c.word_list != "none" or c.ban_words or c.no_repeat_ngram_size:
        print(f"{entry.key}: generation.constraints are not applied in a pinned environment (its own "
              "transformers' generate); its captions are unconstrained")
    if params.generation.grid_buckets or params.generation.warmup:
        print(f"{entry.key}: generation.grid_buckets and generation.warmup are not applied in a pinned "
              "environment (one image at a time there)")


def _caption_splits_pinned(params: Any, entry: ModelEntry, files: Mapping[str, Path],
                           max_images: Optional[int], path: Optional[str] = None) -> list[dict]:
    """:func:`_caption_splits` for a model that runs in its pinned environment (one subprocess a split)."""
    settings = pinned_settings(params, entry)
    _warn_unconstrained(params, entry)
    rows = []
    for split, split_path in files.items():
        records = list(jio.read_jsonl(split_path))
        if max_images is not None:
            records = records[:max_images]
        out = prediction_path(params, entry.key, split)
        summary = caption_records_pinned(
            entry, path or model_path(params, entry.key), records, params.images_dir, out,
            env_parent=env_root(params), dtype=settings["dtype"], load_in_4bit=settings["load_in_4bit"],
            revision=settings["revision"], max_new_tokens=params.generation.max_new_tokens,
            num_beams=params.generation.num_beams, prompt=params.generation.prompt, extra={"split": split})
        write_prediction_meta(out, entry, summary, prompt=params.generation.prompt,
                              revision=settings["revision"] or summary.get("commit"))
        rows.append({"model": entry.key, "split": split, "hub_id": entry.hub_id,
                     "contamination": contamination_flag(entry), **summary,
                     "pred_path": str(out), "split_path": str(split_path)})
    return rows


def run_zero_shot(params: Any, splits: Optional[Sequence[str]] = None, models: Optional[Sequence[str]] = None,
                  max_images: Optional[int] = None, options: EngineOptions = EngineOptions()) -> Any:
    """Caption every split with every model (defaults: ``params.zero_shot``) into
    ``<run_dir>/predictions/<model>__<split>.jsonl``; one summary row per (model, split), as a DataFrame.

    A split whose ``<processed_dir>/<split>.jsonl`` is missing is skipped with a printed note; a
    model that fails to load gets a row with its ``error`` and the run goes on. Each model loads in
    4 bit as its registry entry says (``load_in_4bit``; None: ``model.load_in_4bit``); a model of a
    pinned environment captions there (:mod:`.pinned`). Holds the run folder's lock (``io.run_lock``).
    """
    import pandas as pd

    splits = list(splits if splits is not None else params.zero_shot.splits)
    names = list(models if models is not None else params.zero_shot.models)
    max_images = max_images if max_images is not None else params.zero_shot.max_images
    rows = []
    with run_lock(params.run_dir, "caption"):
        process_group()  # under accelerate launch: bind each process to its GPU before a model loads
        files = split_files(params, splits)
        for name in names:
            if not files:
                break
            try:
                entry = resolve(name)
                if runs_pinned(params, entry):
                    rows += _caption_splits_pinned(params, entry, files, max_images)
                    continue
                model, processor, entry = load_model(params, name, load_in_4bit=entry.load_in_4bit)
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
        process_group()  # under accelerate launch: bind each process to its GPU before a model loads
        files = split_files(params, splits)
        model, processor, entry = load_model(params, adapter=str(adapter))
        try:
            rows = _caption_splits(params, model, processor, entry, entry.key + FINETUNED_SUFFIX, files,
                                   max_images, adapter=str(adapter), options=options)
        finally:
            del model, processor
            _free_memory()
    return pd.DataFrame(rows)


def caption_file(params: Any, name: str, records: Sequence[Mapping[str, Any]], images_dir: str | Path,
                 out: str | Path, *, model_dir: Optional[str] = None, adapter: Optional[str] = None,
                 keep_file_name: bool = False, progress: bool = True,
                 options: EngineOptions = EngineOptions()) -> dict:
    """Caption ``records`` with one model into ``out`` (resumable JSONL + ``.meta.json``): what
    ``jpcap caption`` runs. ``name`` is a registry key or hub id; ``model_dir`` a local folder in its
    hub layout instead of the hub; ``adapter`` a trained LoRA adapter on top. A pinned-environment
    model runs there (no adapter, one GPU). Generation settings come from ``params.generation``.
    Under ``accelerate launch`` the records are sharded over the GPUs (:mod:`.sharding`). Rank 0
    holds the output folder's lock (one writer)."""
    out = Path(out)
    entry = resolve(name)
    gen = params.generation
    rank, world, _ = process_group()  # binds this process to its GPU before the model loads
    with run_lock(out.parent, "caption"):
        if runs_pinned(params, entry):
            if adapter:
                raise ValueError(f"{entry.key} runs in its pinned environment: adapters are not supported there")
            if world > 1:
                raise ValueError(f"{entry.key} runs in its pinned environment on one GPU: run it without "
                                 "accelerate launch")
            settings = pinned_settings(params, entry)
            _warn_unconstrained(params, entry)
            summary = caption_records_pinned(
                entry, model_dir or model_path(params, entry.key), records, images_dir, out,
                env_parent=env_root(params), dtype=settings["dtype"], load_in_4bit=settings["load_in_4bit"],
                revision=settings["revision"], max_new_tokens=gen.max_new_tokens, num_beams=gen.num_beams,
                prompt=gen.prompt, progress=progress, keep_file_name=keep_file_name)
            revision = settings["revision"]
        else:
            quant = None if adapter else entry.load_in_4bit
            model, processor, entry = load_model(params, name, load_in_4bit=quant, adapter=adapter, path=model_dir)
            grids = plan_grids(processor, records, images_dir, gen.grid_buckets)  # over all records

            def caption(shard: list, path: Path, planned: Optional[list] = None) -> dict:
                return caption_records(
                    model, processor, entry, shard, images_dir, path, batch_size=gen.batch_size,
                    max_new_tokens=gen.max_new_tokens, num_beams=gen.num_beams, prompt=gen.prompt,
                    decoder=gen.decoder, progress=progress and rank == 0, options=options,
                    constraints=gen.constraints, keep_file_name=keep_file_name,
                    grid_buckets=gen.grid_buckets, grids=grids, warmup=gen.warmup, warmup_batches=planned)

            plan = _batch_planner(model, processor, entry, images_dir, gen, grids)
            try:
                summary = caption_sharded(caption, records, out, plan)
            finally:
                del model, processor
                _free_memory()
            revision = params.model.revision or entry.revision or summary.get("commit")
        if rank == 0:
            write_prediction_meta(out, entry, summary, prompt=gen.prompt, revision=revision,
                                  adapter=str(adapter or ""))
    return summary


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
