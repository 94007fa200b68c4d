"""Prepare: captions + images -> processed JSONL and ``report.json`` (``prepare_dataset`` for the
splits, ``prepare_file`` for one file as ``jpcap prepare`` does, ``prepare_from_params`` for notebook 01)."""
from __future__ import annotations

import hashlib
import os
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from .. import __version__
from ..io import atomic_write_json, atomic_write_jsonl
from .cleaning import clean_captions, resolve_tokenizer, tokenizer_name
from .coco import load_coco_captions
from .download import download_coco_images
from .images import DEFAULT_MAX_SIDE, SizeRule, check_many, resolve_image_path
from .records import (
    EXAMPLES_PER_REASON,
    STAIR_TRAIN_FILE,
    STAIR_VAL_FILE,
    YJ_FILE,
    DataError,
    ImageLoadError,
    ImageRecord,
)
from .splits import make_splits, split_file_names, split_hash, split_summary


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _input_info(path: Path) -> dict:
    return {"path": str(path), "bytes": path.stat().st_size, "sha256": _file_sha256(path)[:16]}


def _rule_name(reject: SizeRule | None) -> str | None:
    """``module.name`` of the size rule, for report.json."""
    if reject is None:
        return None
    return f"{getattr(reject, '__module__', '?')}.{getattr(reject, '__qualname__', repr(reject))}"


def _pairs(records: Iterable[ImageRecord]) -> Iterable[dict]:
    for r in records:
        for cap in r.captions:
            yield {"image_id": r.image_id, "file_name": r.file_name, "caption": cap}


def _check_records(records_by_name: dict[str, list[ImageRecord]], images_root: Path, *, max_side: int | None,
                   workers: int | None, progress: bool,
                   reject: SizeRule | None) -> tuple[dict[str, str], dict[str, str], dict]:
    """Check each distinct image once; (reason by file_name, detail by file_name, layout counts).

    A name that leaves ``images_root`` gets ``outside_images_root`` and is never opened."""
    names = sorted({r.file_name for recs in records_by_name.values() for r in recs})
    reasons: dict[str, str] = {}
    details: dict[str, str] = {}
    paths: dict[str, Path] = {}
    for n in names:
        try:
            paths[n] = resolve_image_path(images_root, n)
        except ImageLoadError as e:
            reasons[n], details[n] = e.reason, e.detail
    layout = Counter("coco_root" if p == images_root / n else "flat" for n, p in paths.items() if p.exists())
    results = check_many(list(paths.values()), max_side=max_side, workers=workers, progress=progress,
                         reject=reject)
    for n, (reason, detail) in zip(paths, results):
        if reason:
            reasons[n], details[n] = reason, detail
    layout["files"] = len(names)
    return reasons, details, dict(layout)


def prepare_dataset(stair_dir: str | os.PathLike, images_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                    yj_path: str | os.PathLike | None = None, karpathy_path: str | os.PathLike | None = None,
                    val_size: int = 5000, test_size: int = 5000, train_subset: int | None = None,
                    val_subset: int | None = None, test_subset: int | None = None, yj_subset: int | None = None,
                    seed: int = 0, max_caption_tokens: int = 64, tokenizer: Any = None, check_images: bool = True,
                    max_side: int | None = DEFAULT_MAX_SIDE, reject: SizeRule | None = None,
                    workers: int | None = None, yj_subfolder: str | None = "train2014", progress: bool = True) -> dict:
    """Load STAIR train/val (+ YJ), clean captions, split, check the selected images, write outputs.

    Writes (each atomically) ``<out_dir>/{train,val,test}.jsonl`` (+ ``yj_test.jsonl`` with YJ),
    ``train_pairs.jsonl`` (one row per caption) and, last, ``report.json``; returns the report.
    Images that fail the checks (:func:`.images.check_image` with ``max_side`` and the model's size
    rule ``reject``; a name leaving ``images_dir``: ``outside_images_root``, never opened) are
    removed from their split, so a split can end up slightly smaller than asked; the report says
    which and why. ``yj_subfolder`` is only the last
    resort for YJ images with neither a COCO file name/URL nor a file found in ``images_dir``
    (counted as ``guessed`` in ``load.yj.file_name_sources``).
    """
    t0 = time.time()
    stair_dir, images_dir, out_dir = Path(stair_dir), Path(images_dir), Path(out_dir)
    if check_images and not images_dir.is_dir():
        raise DataError(f"{images_dir}: images folder not found")
    tokenizer = resolve_tokenizer(tokenizer)
    sources = {"stair_train": stair_dir / STAIR_TRAIN_FILE, "stair_val": stair_dir / STAIR_VAL_FILE}
    if yj_path is not None:
        sources["yj"] = Path(yj_path)
    loaded, load_reports, cleaning = {}, {}, {}
    for key, path in sources.items():
        records, rep = load_coco_captions(path, yj_subfolder if key == "yj" else None,
                                          images_root=images_dir if images_dir.is_dir() else None)
        cleaning[key] = clean_captions(records, tokenizer, max_caption_tokens)
        loaded[key], load_reports[key] = records, rep.as_dict()
    splits, split_info = make_splits(
        loaded["stair_train"], loaded["stair_val"], val_size=val_size, test_size=test_size,
        train_subset=train_subset, val_subset=val_subset, test_subset=test_subset, seed=seed,
        yj_records=loaded.get("yj"), yj_subset=yj_subset, karpathy_path=karpathy_path)

    split_info["splits_before_image_checks"] = split_info.pop("splits")
    image_checks: dict[str, Any] = {"checked": False}
    if check_images:
        reasons, details, layout = _check_records(splits, images_dir, max_side=max_side, workers=workers,
                                                  progress=progress, reject=reject)
        examples: dict[str, list] = {}
        removed: dict[str, int] = {}
        for name, recs in splits.items():
            bad = [r for r in recs if r.file_name in reasons]
            removed[name] = len(bad)
            for r in bad:
                lst = examples.setdefault(reasons[r.file_name], [])
                if len(lst) < EXAMPLES_PER_REASON:
                    lst.append({"image_id": r.image_id, "file_name": r.file_name, "split": name,
                                "detail": details.get(r.file_name, "")})
            splits[name] = [r for r in recs if r.file_name not in reasons]
        n_checked = layout.pop("files")
        image_checks = {"checked": True, "images_root": str(images_dir), "max_side": max_side,
                        "layout": layout, "files_checked": n_checked, "files_skipped": len(reasons),
                        "skipped_by_reason": dict(sorted(Counter(reasons.values()).items())),
                        "removed_per_split": removed, "examples": examples}

    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, recs in splits.items():
        files[name] = atomic_write_jsonl(out_dir / f"{name}.jsonl", (r.to_dict() for r in recs)).name
    files["train_pairs"] = atomic_write_jsonl(out_dir / "train_pairs.jsonl", _pairs(splits["train"])).name
    stale = out_dir / "yj_test.jsonl"
    removed_stale = None
    if "yj_test" not in splits and stale.exists():  # from an earlier run with YJ: would mislead
        stale.unlink()
        removed_stale = stale.name

    report = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "jpcap_version": __version__,
        "config": {"stair_dir": str(stair_dir), "images_dir": str(images_dir), "out_dir": str(out_dir),
                   "yj_path": str(yj_path) if yj_path is not None else None,
                   "karpathy_path": str(karpathy_path) if karpathy_path is not None else None,
                   "val_size": val_size, "test_size": test_size, "train_subset": train_subset,
                   "val_subset": val_subset, "test_subset": test_subset, "yj_subset": yj_subset, "seed": seed,
                   "max_caption_tokens": max_caption_tokens, "tokenizer": tokenizer_name(tokenizer),
                   "check_images": check_images, "max_side": max_side, "size_rule": _rule_name(reject),
                   "yj_subfolder": yj_subfolder},
        "inputs": {key: _input_info(path) for key, path in sources.items()},
        "load": load_reports,
        "cleaning": cleaning,
        "split_info": split_info,
        "image_checks": image_checks,
        "splits": split_summary(splits),
        "files": files,
        "removed_stale_file": removed_stale,
        "seconds": round(time.time() - t0, 2),
    }
    atomic_write_json(out_dir / "report.json", report)
    return report


def prepare_file(captions: str | os.PathLike, images: str | os.PathLike, out_dir: str | os.PathLike, *,
                 tokenizer: Any = None, max_caption_tokens: int = 64, max_side: int | None = DEFAULT_MAX_SIDE,
                 reject: SizeRule | None = None, workers: int | None = None, progress: bool = True) -> dict:
    """`jpcap prepare` for one COCO-format file: ``<out_dir>/<stem>.jsonl`` + ``<out_dir>/report.json``.

    Every dropped caption and skipped image is listed in the report with its reason; the report's
    ``problems`` lists them as lines (what ``--strict`` prints). ``reject`` is the model's image size
    rule (``models.image_rules.processor_rejection``); ``tokenizer`` an object or a local folder.
    """
    captions, images, out_dir = Path(captions), Path(images), Path(out_dir)
    if not images.is_dir():
        raise DataError(f"{images}: images folder not found")
    tokenizer = resolve_tokenizer(tokenizer)
    records, load_rep = load_coco_captions(captions, images_root=images)
    caption_total = load_rep.n_annotations
    cleaning = clean_captions(records, tokenizer, max_caption_tokens)
    reasons, details, layout = _check_records({"all": records}, images, max_side=max_side, workers=workers,
                                              progress=progress, reject=reject)
    layout.pop("files")
    kept = [r for r in records if r.file_name not in reasons]

    def skipped(image_id, file_name, reason, detail="", n_caps=0):
        return {"image_id": image_id, "file_name": file_name, "reason": reason, "detail": detail,
                "captions_dropped": n_caps}

    skipped_images = [skipped(r.image_id, r.file_name, reasons[r.file_name], details.get(r.file_name, ""),
                              len(r.captions)) for r in records if r.file_name in reasons]
    skipped_images += [skipped(i, None, "no_captions") for i in load_rep.images_without_captions]
    skipped_images += [skipped(i, None, "no_captions_after_cleaning") for i in cleaning["images_dropped_ids"]]
    skipped_images += [skipped(i, None, "file_name_unresolved") for i in load_rep.unresolved_images]
    skipped_captions = [dict(d) for d in load_rep.dropped_captions]
    skipped_captions += [{"annotation_id": None, **d} for d in cleaning["dropped_captions"]]
    caption_reasons = Counter(d["reason"] for d in skipped_captions)
    img_caps = sum(s["captions_dropped"] for s in skipped_images)
    if img_caps:
        caption_reasons["image_skipped"] += img_caps
    kept_caps = sum(len(r.captions) for r in kept)
    distinct_images = load_rep.n_images - len(load_rep.duplicate_image_entries)

    problems = [f"caption {d['annotation_id']} (image {d['image_id']}): {d['reason']}"
                + (f" {d['caption']!r}" if "caption" in d else "") for d in skipped_captions]
    problems += [f"image {s['image_id']}" + (f" {s['file_name']}" if s["file_name"] else "") + f": {s['reason']}"
                 + (f" ({s['detail']})" if s["detail"] else "") for s in skipped_images]
    problems += [f"image {i}: duplicate entry in 'images' (first kept)" for i in load_rep.duplicate_image_entries]

    out_dir.mkdir(parents=True, exist_ok=True)
    out_file = atomic_write_jsonl(out_dir / f"{captions.stem}.jsonl", (r.to_dict() for r in kept))
    report = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "captions_file": _input_info(captions), "images_root": str(images), "layout": layout,
        "output": out_file.name, "hash": split_hash(kept),
        "images": {"in_file": distinct_images, "kept": len(kept), "skipped": len(skipped_images),
                   "duplicate_entries": len(load_rep.duplicate_image_entries),
                   "skipped_by_reason": dict(sorted(Counter(s["reason"] for s in skipped_images).items()))},
        "captions": {"in_file": caption_total, "kept": kept_caps, "skipped": caption_total - kept_caps,
                     "skipped_by_reason": dict(sorted(caption_reasons.items()))},
        "skipped_images": skipped_images,
        "skipped_captions": skipped_captions,
        "load": load_rep.as_dict(),
        "cleaning": cleaning,
        "config": {"max_caption_tokens": max_caption_tokens, "tokenizer": tokenizer_name(tokenizer),
                   "max_side": max_side, "size_rule": _rule_name(reject)},
        "problems": problems,
    }
    atomic_write_json(out_dir / "report.json", report)
    return report


def prepare_from_params(params, tokenizer: Any, reject: SizeRule | None = None, progress: bool = True) -> dict:
    """Clean, split and check the data of ``params`` into ``params.processed_dir``; returns report.json.

    ``tokenizer`` and ``reject`` are the model's (``models.load_tokenizer(params)``,
    ``models.image_rules.processor_rejection``): captions are truncated to ``data.max_caption_tokens`` of it,
    images its processor refuses are skipped. With ``data.download`` on, only the COCO images the chosen
    splits need are fetched, between a first pass that selects them (no image checks) and the final
    pass that checks them."""
    d = params.data
    kwargs = dict(
        yj_path=(Path(d.root) / YJ_FILE) if d.use_yj else None, karpathy_path=d.karpathy_json,
        val_size=d.val_size, test_size=d.test_size, train_subset=d.train_subset, val_subset=d.val_subset,
        test_subset=d.test_subset, yj_subset=d.yj_subset, seed=params.run.seed,
        max_caption_tokens=d.max_caption_tokens, tokenizer=tokenizer, reject=reject, progress=progress)
    out_dir = params.processed_dir
    if d.source == "stair" and d.download:
        prepare_dataset(d.root, params.images_dir, out_dir, check_images=False, **kwargs)
        Path(params.images_dir).mkdir(parents=True, exist_ok=True)
        fetched = download_coco_images(split_file_names(out_dir), params.images_dir, progress=progress)
        if fetched["failed"]:
            print(f"{len(fetched['failed'])} COCO images could not be fetched; they are skipped and counted")
    return prepare_dataset(d.root, params.images_dir, out_dir, check_images=True, **kwargs)

