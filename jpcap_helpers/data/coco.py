"""COCO-format caption files (STAIR, YJ) into :class:`ImageRecord` s, every drop counted with its reason.

An image's ``file_name`` is relative to the COCO image root (``train2014/COCO_train2014_...jpg``);
where it comes from is in :func:`load_coco_captions`. Whether a name stays inside the images
folder is decided later, when the file is looked up (:func:`.images.resolve_image_path`).
"""
from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .records import COCO_SUBFOLDERS, EXAMPLES_PER_REASON, DataError, ImageRecord, as_int, read_json

# Caption drop reasons (load_coco_captions; cleaning adds its own).
DROP_DUPLICATE_ID = "duplicate_annotation_id"
DROP_UNKNOWN_IMAGE = "unknown_image_id"
DROP_UNRESOLVED_IMAGE = "image_file_name_unresolved"
DROP_NULL = "caption_null"
DROP_NOT_STRING = "caption_not_string"
DROP_EMPTY = "caption_empty"

_COCO_NAME_RE = re.compile(r"COCO_(train|val)2014_(\d{12})\.jpg")
_COCO2017_NAME_RE = re.compile(r"(\d{12})\.jpg")


@dataclass
class LoadReport:
    """What :func:`load_coco_captions` kept and dropped (every drop with its reason)."""

    path: str
    n_images: int = 0                 # entries of "images"
    n_annotations: int = 0            # entries of "annotations"
    n_records: int = 0                # images kept (with at least one caption)
    n_captions: int = 0               # captions kept
    dropped_captions: list[dict] = field(default_factory=list)  # {annotation_id, image_id, reason}
    images_without_captions: list[int] = field(default_factory=list)
    unresolved_images: list[int] = field(default_factory=list)  # no file name could be derived
    duplicate_image_entries: list[int] = field(default_factory=list)
    file_name_sources: dict[str, int] = field(default_factory=dict)  # file_name/coco_url/probed/guessed
    annotation_ids_synthesized: bool = False

    def dropped_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(d["reason"] for d in self.dropped_captions).items()))

    def as_dict(self, max_examples: int | None = EXAMPLES_PER_REASON) -> dict:
        """JSON-ready summary; ``max_examples=None`` keeps every dropped caption."""
        examples: dict[str, list] = {}
        for d in self.dropped_captions:
            lst = examples.setdefault(d["reason"], [])
            if max_examples is None or len(lst) < max_examples:
                lst.append({"annotation_id": d["annotation_id"], "image_id": d["image_id"]})
        cut = (lambda xs: xs) if max_examples is None else (lambda xs: xs[:max_examples])
        return {
            "path": self.path, "n_images": self.n_images, "n_annotations": self.n_annotations,
            "n_records": self.n_records, "n_captions": self.n_captions,
            "dropped_captions": self.dropped_counts(), "dropped_caption_examples": examples,
            "images_without_captions": len(self.images_without_captions),
            "images_without_captions_examples": cut(self.images_without_captions),
            "unresolved_images": len(self.unresolved_images),
            "unresolved_image_examples": cut(self.unresolved_images),
            "duplicate_image_entries": len(self.duplicate_image_entries),
            "file_name_sources": dict(self.file_name_sources),
            "annotation_ids_synthesized": self.annotation_ids_synthesized,
        }


def _guess_subfolder(path: Path) -> str | None:
    stem = path.stem.lower()
    if re.search(r"(^|[_\-.])train", stem):
        return "train2014"
    if re.search(r"(^|[_\-.])val", stem):
        return "val2014"
    return None


def _coco_name(subfolder: str, image_id: int) -> str:
    return f"{subfolder}/COCO_{subfolder}_{image_id:012d}.jpg"


def _file_name_from_entry(img: dict, default_subfolder: str | None) -> tuple[str | None, str | None]:
    """(file name relative to the COCO root, where it came from) from an ``images`` entry."""
    fn = img.get("file_name")
    if isinstance(fn, str) and fn.strip():
        fn = fn.strip().replace("\\", "/")
        m = _COCO_NAME_RE.search(fn)
        if m:
            return f"{m.group(1)}2014/{m.group(0)}", "file_name"
        base = fn.rsplit("/", 1)[-1]
        m17 = _COCO2017_NAME_RE.fullmatch(base)
        if m17 and default_subfolder in COCO_SUBFOLDERS:  # 2017 naming -> the 2014 file
            return _coco_name(default_subfolder, int(m17.group(1))), "file_name"
        if "/" in fn:  # kept as given: an absolute or escaping name is refused at lookup
            return fn, "file_name"
        return (f"{default_subfolder}/{fn}" if default_subfolder else fn), "file_name"
    for key in ("coco_url", "flickr_url", "url"):
        url = img.get(key)
        if isinstance(url, str):
            m = _COCO_NAME_RE.search(url)
            if m:
                return f"{m.group(1)}2014/{m.group(0)}", key
    return None, None


def load_coco_captions(path: str | os.PathLike, subfolder: str | None = None, *,
                       images_root: str | os.PathLike | None = None) -> tuple[list[ImageRecord], LoadReport]:
    """Read a COCO-format captions file (STAIR or YJ) into :class:`ImageRecord` s sorted by id.

    An image's file name comes from its ``file_name`` (COCO 2014 names give their own subfolder),
    else from a ``COCO_{train,val}2014_`` name inside ``coco_url``/``flickr_url``, else it is looked
    for in ``images_root`` (both ``train2014/`` and ``val2014/``), else built from the id and
    ``subfolder`` (or the one the file's name suggests: ``..._train.json`` -> ``train2014``).
    Captions that are null, not strings, blank, of unknown/unresolved images or with a duplicate
    annotation id are dropped and counted; images left without captions are dropped and counted.
    Malformed JSON or a missing/ill-typed key raises one :class:`DataError`.
    """
    path = Path(path)
    data = read_json(path, "captions file")
    if not isinstance(data, dict):
        raise DataError(f"{path}: top level must be an object with 'images' and 'annotations', "
                        f"got {type(data).__name__}; is this a COCO-format captions file?")
    for key in ("images", "annotations"):
        if key not in data:
            raise DataError(f"{path}: missing key '{key}' (a COCO-format captions file has the lists "
                            f"'images' and 'annotations'); is this the right file?")
        if not isinstance(data[key], list):
            raise DataError(f"{path}: '{key}' must be a list, got {type(data[key]).__name__}")

    problems: list[str] = []
    default_sub = subfolder or _guess_subfolder(path)
    root = Path(images_root) if images_root is not None else None
    report = LoadReport(path=str(path), n_images=len(data["images"]), n_annotations=len(data["annotations"]))
    names: dict[int, str | None] = {}
    sources: Counter = Counter()
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict):
            problems.append(f"images[{i}] is {type(img).__name__}, not an object")
            continue
        if "id" not in img:
            problems.append(f"images[{i}] has no key 'id'")
            continue
        image_id = as_int(img["id"])
        if image_id is None:
            problems.append(f"images[{i}].id is {img['id']!r}, not an integer")
            continue
        if image_id in names:
            report.duplicate_image_entries.append(image_id)
            continue
        name, source = _file_name_from_entry(img, default_sub)
        if name is None and root is not None:
            for sub in COCO_SUBFOLDERS:
                cand = _coco_name(sub, image_id)
                if (root / cand).exists() or (root / cand.split("/", 1)[1]).exists():
                    name, source = cand, "probed"
                    break
        if name is None and default_sub is not None:
            name, source = _coco_name(default_sub, image_id), "guessed"
        if name is None:
            report.unresolved_images.append(image_id)
        else:
            sources[source] += 1
        names[image_id] = name
    report.file_name_sources = dict(sorted(sources.items()))

    anns = data["annotations"]
    synthesize_ids = bool(anns) and all(isinstance(a, dict) and "id" not in a for a in anns)
    report.annotation_ids_synthesized = synthesize_ids
    captions: dict[int, list[str]] = {}
    seen_ids: set = set()
    for i, ann in enumerate(anns):
        if not isinstance(ann, dict):
            problems.append(f"annotations[{i}] is {type(ann).__name__}, not an object")
            continue
        missing = [k for k in ("image_id", "caption") + (() if synthesize_ids else ("id",)) if k not in ann]
        if missing:
            problems.append(f"annotations[{i}] has no key {', '.join(repr(k) for k in missing)}")
            continue
        ann_id = i if synthesize_ids else ann["id"]
        image_id = as_int(ann["image_id"])
        if image_id is None:
            problems.append(f"annotations[{i}].image_id is {ann['image_id']!r}, not an integer")
            continue
        try:
            hash(ann_id)
        except TypeError:
            problems.append(f"annotations[{i}].id is {ann_id!r}, not a scalar")
            continue
        if ann_id in seen_ids:
            reason = DROP_DUPLICATE_ID
        else:
            seen_ids.add(ann_id)
            caption = ann["caption"]
            if image_id not in names:
                reason = DROP_UNKNOWN_IMAGE
            elif names[image_id] is None:
                reason = DROP_UNRESOLVED_IMAGE
            elif caption is None:
                reason = DROP_NULL
            elif not isinstance(caption, str):
                reason = DROP_NOT_STRING
            elif not caption.strip():
                reason = DROP_EMPTY
            else:
                captions.setdefault(image_id, []).append(caption)
                continue
        report.dropped_captions.append({"annotation_id": ann_id, "image_id": image_id, "reason": reason})
    if problems:
        shown = "; ".join(problems[:10]) + (f"; ... ({len(problems) - 10} more)" if len(problems) > 10 else "")
        raise DataError(f"{path}: {len(problems)} malformed entr{'y' if len(problems) == 1 else 'ies'}: {shown}; "
                        f"fix or remove them")

    records = []
    for image_id in sorted(names):
        name = names[image_id]
        if name is None:
            continue
        caps = captions.get(image_id)
        if not caps:
            report.images_without_captions.append(image_id)
            continue
        records.append(ImageRecord(image_id, name, caps))
    report.n_records = len(records)
    report.n_captions = sum(len(r.captions) for r in records)
    return records, report


