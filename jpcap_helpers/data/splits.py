"""Leak-free, seeded splits (STAIR val carve or Karpathy), nested subsets, split hashes, processed splits."""
from __future__ import annotations

import hashlib
import json
import os
import random
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..io import read_jsonl
from .records import EXAMPLES_PER_REASON, SPLIT_NAMES, DataError, ImageRecord, as_int, read_json


def load_split(path: str | os.PathLike) -> list[ImageRecord]:
    """Read a processed split (``train.jsonl`` etc.) back into :class:`ImageRecord` s."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: split file not found; run prepare (notebook 01 / `jpcap prepare`) first")
    records = []
    try:
        for i, row in enumerate(read_jsonl(path), start=1):
            if not isinstance(row, dict):
                raise DataError(f"{path}: record {i} is not an object")
            for key in ("image_id", "file_name", "captions"):
                if key not in row:
                    raise DataError(f"{path}: record {i} has no key '{key}'")
            image_id = as_int(row["image_id"])
            caps = row["captions"]
            if image_id is None or not isinstance(row["file_name"], str) or not isinstance(caps, list) \
                    or not all(isinstance(c, str) for c in caps):
                raise DataError(f"{path}: record {i} has a wrong type (image_id int, file_name str, "
                                f"captions list of str)")
            records.append(ImageRecord(image_id, row["file_name"], list(caps)))
    except DataError:
        raise
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); write it again with "
                        f"prepare (notebook 01 / `jpcap prepare`)") from None
    except ValueError as e:  # read_jsonl: a malformed line, named by file and line
        raise DataError(str(e)) from None
    return records


def split_file_names(out_dir: str | os.PathLike, splits: Sequence[str] = SPLIT_NAMES) -> list[str]:
    """Sorted distinct ``file_name`` s of the processed splits in ``out_dir`` (those present): the
    images to fetch with :func:`download_coco_images` (the Colab route, see docs/data.md)."""
    names = set()
    for split in splits:
        path = Path(out_dir) / f"{split}.jsonl"
        if path.exists():
            names.update(r.file_name for r in load_split(path))
    return sorted(names)


def split_hash(records: Iterable[ImageRecord]) -> str:
    """Short sha256 over the sorted image ids and their captions (provenance of a split)."""
    rows = sorted(([r.image_id, list(r.captions)] for r in records), key=lambda x: x[0])
    blob = json.dumps(rows, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def _shuffled_ids(ids: Iterable[int], seed: int, label: str) -> list[int]:
    """Sorted ids in a seeded order (the same on every machine and Python version)."""
    order = sorted(set(ids))
    random.Random(f"jpcap:{label}:{seed}").shuffle(order)
    return order


def _subset(records: list[ImageRecord], n: int | None, seed: int, label: str) -> list[ImageRecord]:
    """The first ``n`` records of a seeded order: smaller subsets are nested in larger ones."""
    if n is None or n >= len(records):
        return sorted(records, key=lambda r: r.image_id)
    if n < 0:
        raise ValueError(f"{label}_subset must be >= 0, got {n}")
    keep = set(_shuffled_ids((r.image_id for r in records), seed, f"{label}_subset")[:n])
    return sorted((r for r in records if r.image_id in keep), key=lambda r: r.image_id)


def _load_karpathy(path: Path) -> dict[int, str]:
    """cocoid -> split ('train'/'val'/'test'; restval folded into train) of a Karpathy file."""
    data = read_json(path, "Karpathy split file")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{path}: missing key 'images' (a list); is this dataset_coco.json of the Karpathy split?")
    out: dict[int, str] = {}
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "cocoid" not in img or "split" not in img:
            raise DataError(f"{path}: images[{i}] needs keys 'cocoid' and 'split'")
        cocoid = as_int(img["cocoid"])
        split = img["split"]
        if cocoid is None or split not in ("train", "restval", "val", "test"):
            raise DataError(f"{path}: images[{i}] has cocoid={img['cocoid']!r}, split={split!r} "
                            f"(want an integer and train/restval/val/test)")
        out[cocoid] = "train" if split == "restval" else split
    return out


def split_summary(splits: dict[str, list[ImageRecord]]) -> dict:
    return {name: {"images": len(recs), "captions": sum(len(r.captions) for r in recs),
                   "hash": split_hash(recs)} for name, recs in splits.items()}


def make_splits(train_records: list[ImageRecord], val_records: list[ImageRecord], *, val_size: int = 5000,
                test_size: int = 5000, train_subset: int | None = None, val_subset: int | None = None,
                test_subset: int | None = None, seed: int = 0, yj_records: list[ImageRecord] | None = None,
                yj_subset: int | None = None, karpathy_path: str | os.PathLike | None = None,
                ) -> tuple[dict[str, list[ImageRecord]], dict]:
    """train / val / test (and yj_test) splits, deterministic for a seed, plus an info dict.

    Default: train = STAIR train; STAIR val's image ids are sorted and shuffled with ``seed``; the
    first ``test_size`` are test, the next ``val_size`` val (so test does not move when val_size
    changes). With ``karpathy_path`` (``dataset_coco.json``) its split is honoured instead
    (restval -> train; sizes ignored). Subsets take the first n of a seeded order (nested).
    ``yj_test`` = YJ minus every image of the training split (COCO ids are shared); the overlaps
    with train/val/test are reported. Each split is sorted by image id and hashed.
    """
    info: dict[str, Any] = {"seed": seed}
    if karpathy_path is not None:
        kp = Path(karpathy_path)
        assignment = _load_karpathy(kp)
        pool: dict[int, ImageRecord] = {}
        for rec in list(train_records) + list(val_records):
            pool.setdefault(rec.image_id, rec)
        full = {"train": [], "val": [], "test": []}
        not_in_karpathy = []
        for image_id in sorted(pool):
            split = assignment.get(image_id)
            if split is None:
                not_in_karpathy.append(image_id)
            else:
                full[split].append(pool[image_id])
        missing = Counter(s for i, s in assignment.items() if i not in pool)
        info.update(method="karpathy", karpathy_path=str(kp), not_in_karpathy=len(not_in_karpathy),
                    not_in_karpathy_examples=not_in_karpathy[:EXAMPLES_PER_REASON],
                    karpathy_without_captions=dict(sorted(missing.items())),
                    note="val_size/test_size ignored: the Karpathy split decides")
    else:
        val_ids = sorted({r.image_id for r in val_records})
        if val_size < 0 or test_size < 0:
            raise ValueError(f"val_size and test_size must be >= 0, got {val_size} and {test_size}")
        if val_size + test_size > len(val_ids):
            raise ValueError(f"val_size + test_size = {val_size + test_size} exceeds the {len(val_ids)} images "
                             f"of STAIR val; pass smaller sizes")
        order = _shuffled_ids(val_ids, seed, "stair_val")
        test_ids, val_part = set(order[:test_size]), set(order[test_size:test_size + val_size])
        by_id = {r.image_id: r for r in val_records}
        full = {
            "train": sorted(train_records, key=lambda r: r.image_id),
            "val": [by_id[i] for i in sorted(val_part)],
            "test": [by_id[i] for i in sorted(test_ids)],
        }
        info.update(method="stair_val_carve", val_size=val_size, test_size=test_size,
                    stair_val_images=len(val_ids), stair_val_unused=len(val_ids) - val_size - test_size)
    splits = {
        "train": _subset(full["train"], train_subset, seed, "train"),
        "val": _subset(full["val"], val_subset, seed, "val"),
        "test": _subset(full["test"], test_subset, seed, "test"),
    }
    info["subsets"] = {"train": train_subset, "val": val_subset, "test": test_subset, "yj_test": yj_subset}
    info["before_subset"] = {name: len(recs) for name, recs in full.items()}
    if yj_records is not None:
        ids = {name: {r.image_id for r in recs} for name, recs in splits.items()}
        pool_ids = {r.image_id for r in full["train"]}
        leaked = sorted(r.image_id for r in yj_records if r.image_id in ids["train"])
        kept = [r for r in yj_records if r.image_id not in ids["train"]]
        info["yj"] = {
            "images": len(yj_records),
            "overlap_train_removed": len(leaked),
            "overlap_train_examples": leaked[:EXAMPLES_PER_REASON],
            "overlap_train_pool": sum(r.image_id in pool_ids for r in yj_records),  # info: before train_subset
            "overlap_val": sum(r.image_id in ids["val"] for r in kept),
            "overlap_test": sum(r.image_id in ids["test"] for r in kept),
            "kept_before_subset": len(kept),
        }
        splits["yj_test"] = _subset(kept, yj_subset, seed, "yj_test")
    for a in ("train", "val", "test"):
        for b in ("train", "val", "test"):
            if a < b and {r.image_id for r in splits[a]} & {r.image_id for r in splits[b]}:
                raise DataError(f"splits {a} and {b} share images: STAIR train and val overlap in the input")
    info["splits"] = split_summary(splits)
    return splits, info

