"""STAIR / YJ caption loaders, image checks, splits, processed JSONL, `jpcap prepare` and downloads.

One in-memory form for every source: :class:`ImageRecord` (one COCO image, its captions, and its
``file_name`` relative to the COCO image root, e.g. ``train2014/COCO_train2014_000000000009.jpg``).
The real STAIR/YJ files and the offline jp-shapes set (:mod:`jpcap_helpers.toydata`) share the
layout, so the same code reads both. See docs/data.md for the formats and the report fields.

Bad input never crashes a run half-way: a malformed file raises one :class:`DataError` naming the
file and what is wrong; a bad caption or image is dropped and counted with its reason.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import http.client
import json
import os
import random
import re
import socket
import sys
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
import zipfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm.auto import tqdm

from .io import atomic_copy_stream, atomic_write_json, atomic_write_jsonl, read_jsonl
from .text import NormalizeStats, normalize_caption, truncate_to_tokens

__all__ = [
    "ImageRecord", "LoadReport", "DataError", "ImageLoadError", "DownloadError",
    "load_coco_captions", "load_image", "check_image", "processor_rejection", "resolve_image_path",
    "clean_captions", "make_splits", "split_hash", "prepare_dataset", "prepare_file", "load_split",
    "split_file_names",
    "add_prepare_arguments", "run_prepare",
    "download_file", "download_stair", "download_yj", "download_coco_images",
]

# --------------------------------------------------------------------------- constants

STAIR_TRAIN_FILE = "stair_captions_v1.2_train.json"
STAIR_VAL_FILE = "stair_captions_v1.2_val.json"
YJ_FILE = "yjcaptions26k_clean.json"

STAIR_URL = "https://github.com/STAIR-Lab-CIT/STAIR-captions/raw/HEAD/stair_captions_v1.2.tar.gz"
YJ_URL = "https://github.com/yahoojapan/YJCaptions/raw/HEAD/yjcaptions26k.zip"
COCO_BASE_URL = "http://images.cocodataset.org"  # single images: {base}/{train2014|val2014}/{file}
COCO_ZIP_URLS = {
    "train2014": "http://images.cocodataset.org/zips/train2014.zip",  # ~13 GB, 82,783 images
    "val2014": "http://images.cocodataset.org/zips/val2014.zip",      # ~6 GB, 40,504 images
}
COCO_SUBFOLDERS = ("train2014", "val2014")
SPLIT_NAMES = ("train", "val", "test", "yj_test")

DEFAULT_MAX_SIDE = 1024     # load_image's default: the processor downsizes further (max_pixels)
EXAMPLES_PER_REASON = 10    # ids kept per reason in report.json
USER_AGENT = "jpcap/0.1 (+https://github.com/; research data download)"

# Caption drop reasons (load_coco_captions, clean_captions).
DROP_DUPLICATE_ID = "duplicate_annotation_id"
DROP_UNKNOWN_IMAGE = "unknown_image_id"
DROP_UNRESOLVED_IMAGE = "image_file_name_unresolved"
DROP_NULL = "caption_null"
DROP_NOT_STRING = "caption_not_string"
DROP_EMPTY = "caption_empty"
DROP_EMPTY_AFTER_NORMALIZE = "empty_after_normalize"
DROP_EMPTY_AFTER_TRUNCATE = "empty_after_truncate"

# Image skip reasons (check_image / load_image).
IMAGE_SKIP_REASONS = ("missing", "empty", "not_an_image", "truncated", "corrupt", "too_large",
                      "unsupported_mode", "aspect_ratio")

_COCO_NAME_RE = re.compile(r"COCO_(train|val)2014_(\d{12})\.jpg")
_COCO2017_NAME_RE = re.compile(r"(\d{12})\.jpg")


class DataError(ValueError):
    """A captions/split file that cannot be used as a whole (bad JSON, missing key, wrong type)."""


class ImageLoadError(ValueError):
    """An image that cannot be used; ``reason`` is one of :data:`IMAGE_SKIP_REASONS`."""

    def __init__(self, reason: str, path: str | os.PathLike, detail: str = ""):
        self.reason, self.path, self.detail = reason, str(path), detail
        super().__init__(f"{path}: {reason}" + (f" ({detail})" if detail else ""))


class DownloadError(OSError):
    """A download that failed for good (after its retries)."""


# --------------------------------------------------------------------------- records


@dataclass
class ImageRecord:
    """One image and its captions; ``file_name`` is relative to the COCO image root."""

    image_id: int
    file_name: str
    captions: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"image_id": self.image_id, "file_name": self.file_name, "captions": list(self.captions)}


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


def _as_int(value: Any) -> int | None:
    """An int id (digit strings accepted); None for anything else (bools included)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


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
        if "/" in fn:
            return fn.lstrip("/"), "file_name"
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
    if not path.is_file():
        raise DataError(f"{path}: captions file not found")
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: top level must be an object with 'images' and 'annotations', "
                        f"got {type(data).__name__}")
    for key in ("images", "annotations"):
        if key not in data:
            raise DataError(f"{path}: missing key '{key}'")
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
        image_id = _as_int(img["id"])
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
        image_id = _as_int(ann["image_id"])
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
        raise DataError(f"{path}: {len(problems)} malformed entr{'y' if len(problems) == 1 else 'ies'}: {shown}")

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


def load_split(path: str | os.PathLike) -> list[ImageRecord]:
    """Read a processed split (``train.jsonl`` etc.) back into :class:`ImageRecord` s."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: split file not found")
    records = []
    try:
        for i, row in enumerate(read_jsonl(path), start=1):
            if not isinstance(row, dict):
                raise DataError(f"{path}: record {i} is not an object")
            for key in ("image_id", "file_name", "captions"):
                if key not in row:
                    raise DataError(f"{path}: record {i} has no key '{key}'")
            image_id = _as_int(row["image_id"])
            caps = row["captions"]
            if image_id is None or not isinstance(row["file_name"], str) or not isinstance(caps, list) \
                    or not all(isinstance(c, str) for c in caps):
                raise DataError(f"{path}: record {i} has a wrong type (image_id int, file_name str, "
                                f"captions list of str)")
            records.append(ImageRecord(image_id, row["file_name"], list(caps)))
    except DataError:
        raise
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


# --------------------------------------------------------------------------- images


def resolve_image_path(images_root: str | os.PathLike, file_name: str) -> Path:
    """The image file for ``file_name`` under ``images_root``: the COCO root (holding ``train2014/``)
    or a folder holding the images directly. Returns the COCO-root path when neither exists."""
    root = Path(images_root)
    full = root / file_name
    if full.exists():
        return full
    flat = root / Path(file_name).name
    if flat.exists():
        return flat
    return full


@functools.lru_cache(maxsize=None)
def _smart_resize():
    """transformers' Qwen2-VL ``smart_resize`` (the PIL-backend module avoids torchvision)."""
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
    except ImportError:  # older/newer layouts
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize
    return smart_resize


def processor_rejection(width: int, height: int) -> str | None:
    """'aspect_ratio' when Qwen2-VL's image processor would refuse a ``width`` x ``height`` image.

    Calls the processor's own ``smart_resize`` (it raises for an aspect ratio above 200; tiny
    images, even 1x1, are upscaled and accepted), so the rule follows the installed transformers.
    """
    try:
        _smart_resize()(height, width)
    except ValueError:
        return "aspect_ratio"
    return None


def _open_image(path: Path) -> Image.Image:
    """Open lazily. JPEGs bypass Pillow's pixel-count check at open (they decode at reduced scale
    via ``draft``; :func:`load_image` applies its own limit to the decoded size)."""
    with open(path, "rb") as fh:
        head = fh.read(3)
    if head == b"\xff\xd8\xff":
        from PIL import JpegImagePlugin
        try:
            return JpegImagePlugin.JpegImageFile(path)
        except Exception:  # noqa: BLE001 - let Image.open classify it below
            pass
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(path)


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB copy: alpha (RGBA/LA/PA, palette or tRNS transparency) composited on white, CMYK/L/1/P
    converted, 16-bit/float greyscale rescaled to 8 bits."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        white.alpha_composite(rgba)
        return white.convert("RGB")
    if mode.startswith("I") or mode == "F":
        import numpy as np

        arr = np.asarray(im).astype(np.float64)
        peak = float(arr.max()) if arr.size else 0.0
        if mode == "F" and peak <= 1.0:
            arr = arr * 255.0
        elif peak > 255:
            arr = arr * (255.0 / 65535.0)
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L").convert("RGB")
    return im.convert("RGB")


def load_image(path: str | os.PathLike, max_side: int | None = DEFAULT_MAX_SIDE, *,
               max_decode_pixels: int | None = None) -> Image.Image:
    """Load an image as RGB with its EXIF orientation applied and its longer side at most ``max_side``.

    JPEGs are decoded at reduced scale (``Image.draft``) before the final ``thumbnail``, so a huge
    photo never materialises at full size. Images whose *decoded* size exceeds
    ``max_decode_pixels`` (default: Pillow's ``Image.MAX_IMAGE_PIXELS``, its decompression-bomb
    threshold) are refused as ``too_large``. Raises :class:`ImageLoadError` with a reason.
    """
    path = Path(path)
    if not path.exists():
        raise ImageLoadError("missing", path)
    if not path.is_file():
        raise ImageLoadError("not_an_image", path, "not a regular file")
    if path.stat().st_size == 0:
        raise ImageLoadError("empty", path)
    limit = max_decode_pixels if max_decode_pixels is not None else Image.MAX_IMAGE_PIXELS
    try:
        im = _open_image(path)
    except UnidentifiedImageError:
        raise ImageLoadError("not_an_image", path) from None
    except Image.DecompressionBombError as e:
        raise ImageLoadError("too_large", path, str(e)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageLoadError("corrupt", path, f"{type(e).__name__}: {e}") from None
    try:
        with im:
            width, height = im.size
            if max_side and max(width, height) > max_side and im.format in ("JPEG", "MPO"):
                scale = max_side / max(width, height)
                im.draft("RGB", (max(1, int(width * scale)), max(1, int(height * scale))))
            if limit and im.size[0] * im.size[1] > limit:
                raise ImageLoadError("too_large", path, f"{width}x{height}, decodes to {im.size[0]}x{im.size[1]} "
                                     f"> {limit} pixels")
            im.load()
            try:
                out = ImageOps.exif_transpose(im)
            except Exception:  # noqa: BLE001 - unreadable EXIF: keep the pixels as stored
                out = im.copy()
            if out is im or out is None:
                out = im.copy()
        try:
            out = _to_rgb(out)
        except (ValueError, OSError) as e:
            raise ImageLoadError("unsupported_mode", path, f"{out.mode}: {e}") from None
        if max_side and max(out.size) > max_side:
            out.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
        return out
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageLoadError("too_large", path, str(e)) from None
    except OSError as e:
        msg = str(e)
        reason = "truncated" if ("truncated" in msg or "broken data stream" in msg) else "corrupt"
        raise ImageLoadError(reason, path, msg) from None
    except (SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError) as e:
        raise ImageLoadError("corrupt", path, f"{type(e).__name__}: {e}") from None


def _check_image(path: str | os.PathLike, max_side: int | None = DEFAULT_MAX_SIDE,
                 max_decode_pixels: int | None = None) -> tuple[str | None, str]:
    """(skip reason or None, detail) for one image file."""
    try:
        im = load_image(path, max_side=max_side, max_decode_pixels=max_decode_pixels)
    except ImageLoadError as e:
        return e.reason, e.detail
    width, height = im.size
    reason = processor_rejection(width, height)
    if reason:
        return reason, f"{width}x{height} as loaded (ratio {max(width, height) / min(width, height):.1f})"
    return None, ""


def check_image(path: str | os.PathLike, max_side: int | None = DEFAULT_MAX_SIDE, *,
                max_decode_pixels: int | None = None) -> str | None:
    """Why the image at ``path`` cannot be used (one of :data:`IMAGE_SKIP_REASONS`), or None.

    Decodes the whole file exactly as :func:`load_image` will (so truncation is caught) and asks
    Qwen2-VL's ``smart_resize`` about the size as loaded; use the same ``max_side`` for training.
    """
    return _check_image(path, max_side, max_decode_pixels)[0]


def _check_many(paths: Sequence[Path], *, max_side: int | None, workers: int | None, progress: bool,
                desc: str = "checking images") -> list[tuple[str | None, str]]:
    """:func:`_check_image` for many files in a thread pool (decoding releases the GIL)."""
    workers = workers or min(8, os.cpu_count() or 2)
    results: list[tuple[str | None, str]] = [(None, "")] * len(paths)
    with ThreadPoolExecutor(max_workers=workers) as pool, \
            tqdm(total=len(paths), desc=desc, unit="img", disable=not progress) as bar:
        futures = {pool.submit(_check_image, p, max_side): i for i, p in enumerate(paths)}
        for fut in as_completed(futures):
            results[futures[fut]] = fut.result()
            bar.update(1)
    return results


# --------------------------------------------------------------------------- captions


def _load_tokenizer(tokenizer: Any) -> Any:
    """A tokenizer object, or one loaded from a local folder (str/Path)."""
    if tokenizer is None or not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    folder = Path(tokenizer)
    if not folder.is_dir():
        raise DataError(f"{folder}: tokenizer folder not found")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - name the folder, whatever transformers raised
        raise DataError(f"{folder}: cannot load a tokenizer from it ({type(e).__name__}: {e})") from None


def _tokenizer_name(tokenizer: Any) -> str | None:
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
    tokenizer = _load_tokenizer(tokenizer)
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
        "tokenizer": _tokenizer_name(tokenizer),
        "max_caption_tokens": max_caption_tokens if tokenizer is not None else None,
        "truncated": truncated,
        "dropped": dict(sorted(dropped.items())),
        "dropped_captions": dropped_items,                # every one (normally a handful)
        "images_dropped_no_captions": len(images_dropped),
        "images_dropped_ids": images_dropped,
        "duplicate_captions_within_image": dup_within,   # counted only, kept
        "examples": examples,
    }


# --------------------------------------------------------------------------- splits


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
    if not path.is_file():
        raise DataError(f"{path}: Karpathy split file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{path}: missing key 'images' (a list)")
    out: dict[int, str] = {}
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "cocoid" not in img or "split" not in img:
            raise DataError(f"{path}: images[{i}] needs keys 'cocoid' and 'split'")
        cocoid = _as_int(img["cocoid"])
        split = img["split"]
        if cocoid is None or split not in ("train", "restval", "val", "test"):
            raise DataError(f"{path}: images[{i}] has cocoid={img['cocoid']!r}, split={split!r} "
                            f"(want an integer and train/restval/val/test)")
        out[cocoid] = "train" if split == "restval" else split
    return out


def _split_summary(splits: dict[str, list[ImageRecord]]) -> dict:
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
    info["splits"] = _split_summary(splits)
    return splits, info


# --------------------------------------------------------------------------- prepare


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _input_info(path: Path) -> dict:
    return {"path": str(path), "bytes": path.stat().st_size, "sha256": _file_sha256(path)[:16]}


def _pairs(records: Iterable[ImageRecord]) -> Iterable[dict]:
    for r in records:
        for cap in r.captions:
            yield {"image_id": r.image_id, "file_name": r.file_name, "caption": cap}


def _check_records(records_by_name: dict[str, list[ImageRecord]], images_root: Path, *, max_side: int | None,
                   workers: int | None, progress: bool) -> tuple[dict[str, str], dict[str, str], dict]:
    """Check each distinct image once; (reason by file_name, detail by file_name, layout counts)."""
    names = sorted({r.file_name for recs in records_by_name.values() for r in recs})
    paths = [resolve_image_path(images_root, n) for n in names]
    layout = Counter("coco_root" if p == images_root / n else "flat" for n, p in zip(names, paths) if p.exists())
    results = _check_many(paths, max_side=max_side, workers=workers, progress=progress)
    reasons = {n: r for n, (r, _) in zip(names, results) if r}
    details = {n: d for n, (r, d) in zip(names, results) if r}
    layout["files"] = len(names)
    return reasons, details, dict(layout)


def prepare_dataset(stair_dir: str | os.PathLike, images_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                    yj_path: str | os.PathLike | None = None, karpathy_path: str | os.PathLike | None = None,
                    val_size: int = 5000, test_size: int = 5000, train_subset: int | None = None,
                    val_subset: int | None = None, test_subset: int | None = None, yj_subset: int | None = None,
                    seed: int = 0, max_caption_tokens: int = 64, tokenizer: Any = None, check_images: bool = True,
                    max_side: int | None = DEFAULT_MAX_SIDE, workers: int | None = None,
                    yj_subfolder: str | None = "train2014", progress: bool = True) -> dict:
    """Load STAIR train/val (+ YJ), clean captions, split, check the selected images, write outputs.

    Writes (each atomically) ``<out_dir>/{train,val,test}.jsonl`` (+ ``yj_test.jsonl`` with YJ),
    ``train_pairs.jsonl`` (one row per caption) and, last, ``report.json``; returns the report.
    Images that fail :func:`check_image` are removed from their split, so a split can end up
    slightly smaller than asked; the report says which and why. ``yj_subfolder`` is only the last
    resort for YJ images with neither a COCO file name/URL nor a file found in ``images_dir``
    (counted as ``guessed`` in ``load.yj.file_name_sources``).
    """
    t0 = time.time()
    stair_dir, images_dir, out_dir = Path(stair_dir), Path(images_dir), Path(out_dir)
    if check_images and not images_dir.is_dir():
        raise DataError(f"{images_dir}: images folder not found")
    tokenizer = _load_tokenizer(tokenizer)
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
                                                  progress=progress)
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

    from . import __version__
    report = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "jpcap_version": __version__,
        "config": {"stair_dir": str(stair_dir), "images_dir": str(images_dir), "out_dir": str(out_dir),
                   "yj_path": str(yj_path) if yj_path is not None else None,
                   "karpathy_path": str(karpathy_path) if karpathy_path is not None else None,
                   "val_size": val_size, "test_size": test_size, "train_subset": train_subset,
                   "val_subset": val_subset, "test_subset": test_subset, "yj_subset": yj_subset, "seed": seed,
                   "max_caption_tokens": max_caption_tokens, "tokenizer": _tokenizer_name(tokenizer),
                   "check_images": check_images, "max_side": max_side, "yj_subfolder": yj_subfolder},
        "inputs": {key: _input_info(path) for key, path in sources.items()},
        "load": load_reports,
        "cleaning": cleaning,
        "split_info": split_info,
        "image_checks": image_checks,
        "splits": _split_summary(splits),
        "files": files,
        "removed_stale_file": removed_stale,
        "seconds": round(time.time() - t0, 2),
    }
    atomic_write_json(out_dir / "report.json", report)
    return report


def prepare_file(captions: str | os.PathLike, images: str | os.PathLike, out_dir: str | os.PathLike, *,
                 tokenizer: Any = None, max_caption_tokens: int = 64, max_side: int | None = DEFAULT_MAX_SIDE,
                 workers: int | None = None, progress: bool = True) -> dict:
    """`jpcap prepare` for one COCO-format file: ``<out_dir>/<stem>.jsonl`` + ``<out_dir>/report.json``.

    Every dropped caption and skipped image is listed in the report with its reason; the report's
    ``problems`` lists them as lines (what ``--strict`` prints).
    """
    captions, images, out_dir = Path(captions), Path(images), Path(out_dir)
    if not images.is_dir():
        raise DataError(f"{images}: images folder not found")
    tokenizer = _load_tokenizer(tokenizer)
    records, load_rep = load_coco_captions(captions, images_root=images)
    caption_total = load_rep.n_annotations
    cleaning = clean_captions(records, tokenizer, max_caption_tokens)
    reasons, details, layout = _check_records({"all": records}, images, max_side=max_side, workers=workers,
                                              progress=progress)
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
        "config": {"max_caption_tokens": max_caption_tokens, "tokenizer": _tokenizer_name(tokenizer),
                   "max_side": max_side},
        "problems": problems,
    }
    atomic_write_json(out_dir / "report.json", report)
    return report


def add_prepare_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``jpcap prepare`` (a stable contract: other tools call it)."""
    parser.add_argument("--captions", required=True, type=Path, metavar="FILE.json",
                        help="a COCO-format captions file (STAIR or YJ)")
    parser.add_argument("--images", required=True, type=Path, metavar="DIR",
                        help="the COCO image root (holding train2014/, val2014/) or a folder of the images")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR",
                        help="writes DIR/<stem of FILE>.jsonl and DIR/report.json")
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 listing every dropped caption and skipped image (outputs still written)")
    parser.add_argument("--max-caption-tokens", type=int, default=64, metavar="N",
                        help="truncate captions to N tokens of --tokenizer (default 64; needs --tokenizer)")
    parser.add_argument("--tokenizer", type=Path, default=None, metavar="DIR",
                        help="a local tokenizer folder (save_pretrained layout) for truncation")
    parser.add_argument("--max-side", type=int, default=DEFAULT_MAX_SIDE, metavar="PX",
                        help=f"longest image side as loaded for the checks (default {DEFAULT_MAX_SIDE})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def run_prepare(args: argparse.Namespace) -> int:
    """Run ``jpcap prepare``: 0 on success, 1 with ``--strict`` and problems, 2 on an error."""
    try:
        report = prepare_file(args.captions, args.images, args.out, tokenizer=args.tokenizer,
                              max_caption_tokens=args.max_caption_tokens,
                              max_side=getattr(args, "max_side", DEFAULT_MAX_SIDE),
                              progress=not getattr(args, "no_progress", False))
    except (DataError, OSError, ValueError) as e:
        print(f"jpcap prepare: error: {e}", file=sys.stderr)
        return 2
    img, cap = report["images"], report["captions"]
    print(f"{report['output']}: kept {img['kept']}/{img['in_file']} images, {cap['kept']}/{cap['in_file']} captions; "
          f"report: {Path(args.out) / 'report.json'}")
    if args.strict and report["problems"]:
        print(f"jpcap prepare: {len(report['problems'])} problem(s) in {args.captions}:", file=sys.stderr)
        for line in report["problems"]:
            print(f"  {line}", file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------- downloads

class _Retryable(Exception):
    pass


_RETRY_HTTP = {408, 425, 429, 500, 502, 503, 504}


def _parse_content_range(value: str | None) -> tuple[int | None, int | None]:
    """(start, total) of ``bytes start-end/total`` or ``bytes */total``."""
    if not value:
        return None, None
    m = re.match(r"bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", value.strip())
    if not m:
        return None, None
    start = int(m.group(1)) if m.group(1) else None
    total = int(m.group(2)) if m.group(2) != "*" else None
    return start, total


def _download_once(url: str, part: Path, expected_size: int | None, chunk: int, timeout: float,
                   progress: bool) -> None:
    """One attempt: resume ``part`` from its size with a Range request; raises on failure."""
    offset = part.stat().st_size if part.exists() else 0
    if expected_size is not None and offset > expected_size:
        part.unlink()
        offset = 0
    if expected_size is not None and offset == expected_size:
        return
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:
            _, total = _parse_content_range(e.headers.get("Content-Range"))
            if total == offset and (expected_size is None or expected_size == total):
                return  # the part file already holds the whole file
            part.unlink()
            raise _Retryable(f"HTTP 416 for a resume at byte {offset}: restarting") from None
        if e.code in _RETRY_HTTP:
            raise _Retryable(f"HTTP {e.code}") from None
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
    with resp:
        if resp.status == 206:
            start, total = _parse_content_range(resp.headers.get("Content-Range"))
            if start != offset:
                part.unlink(missing_ok=True)
                raise _Retryable(f"server resumed at byte {start}, not {offset}: restarting")
            mode = "ab"
        else:  # 200: the server ignored the Range header, start over
            mode, offset = "wb", 0
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        if expected_size is not None and total is not None and total != expected_size:
            raise DownloadError(f"{url}: server reports {total} bytes, expected {expected_size}")
        with open(part, mode) as fh, tqdm(total=total, initial=offset, unit="B", unit_scale=True,
                                          unit_divisor=1024, desc=part.name[:-5], disable=not progress,
                                          leave=False) as bar:
            try:
                while True:
                    buf = resp.read(chunk)
                    if not buf:
                        break
                    fh.write(buf)
                    bar.update(len(buf))
            finally:
                fh.flush()
                os.fsync(fh.fileno())
    size = part.stat().st_size
    want = total if total is not None else expected_size
    if want is not None and size < want:
        raise _Retryable(f"connection ended at byte {size} of {want}")
    if want is not None and size > want:
        part.unlink()
        raise _Retryable(f"got {size} bytes, more than the {want} announced: restarting")


def download_file(url: str, dest: str | os.PathLike, *, expected_size: int | None = None, chunk: int = 1 << 20,
                  retries: int = 3, timeout: float = 60, progress: bool = True, backoff: float = 1.0) -> Path:
    """Download ``url`` to ``dest``, resumable: bytes go to ``dest + '.part'`` (continued with an
    HTTP Range request after an interruption) and the part is renamed to ``dest`` only when complete.

    An existing ``dest`` (of ``expected_size`` when given) is kept. Network errors, 5xx/408/429 and
    short reads are retried ``retries`` times with exponential backoff (``backoff`` * 1, 2, 4 ... s);
    other HTTP errors fail at once. Raises :class:`DownloadError`.
    """
    dest = Path(dest)
    if dest.exists() and (expected_size is None or dest.stat().st_size == expected_size):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    last: BaseException | None = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            _download_once(url, part, expected_size, chunk, timeout, progress)
            os.replace(part, dest)
            return dest
        except DownloadError:
            raise
        except (_Retryable, urllib.error.URLError, http.client.HTTPException, ConnectionError,
                socket.timeout, TimeoutError) as e:
            last = e
    raise DownloadError(f"{url}: failed after {retries + 1} attempt(s): {type(last).__name__}: {last}")


def _extract_member(stream, dest: Path) -> Path:
    """Copy an archive member's stream to ``dest`` atomically."""
    return atomic_copy_stream(stream, dest)


def download_stair(dest_dir: str | os.PathLike, *, url: str = STAIR_URL, progress: bool = True,
                   keep_archive: bool = True) -> dict[str, Path]:
    """Fetch STAIR Captions v1.2 and extract its train/val JSON into ``dest_dir`` (skipped if there)."""
    dest_dir = Path(dest_dir)
    wanted = {STAIR_TRAIN_FILE: "train", STAIR_VAL_FILE: "val"}
    out = {split: dest_dir / name for name, split in wanted.items()}
    if all(p.exists() for p in out.values()):
        return out
    archive = download_file(url, dest_dir / url.rsplit("/", 1)[-1], progress=progress)
    found = set()
    try:
        with tarfile.open(archive, "r:*") as tf:
            for member in tf:
                name = member.name.rsplit("/", 1)[-1]
                if member.isfile() and name in wanted:
                    _extract_member(tf.extractfile(member), dest_dir / name)  # by basename: no path tricks
                    found.add(name)
    except tarfile.TarError as e:
        raise DownloadError(f"{archive}: not a readable tar archive ({e})") from None
    if set(wanted) - found:
        raise DownloadError(f"{archive}: lacks {sorted(set(wanted) - found)}")
    if not keep_archive:
        archive.unlink()
    return out


def download_yj(dest_dir: str | os.PathLike, *, url: str = YJ_URL, progress: bool = True,
                keep_archive: bool = True) -> Path:
    """Fetch YJ Captions 26k and extract ``yjcaptions26k_clean.json`` into ``dest_dir``."""
    dest_dir = Path(dest_dir)
    dest = dest_dir / YJ_FILE
    if dest.exists():
        return dest
    archive = download_file(url, dest_dir / url.rsplit("/", 1)[-1], progress=progress)
    try:
        with zipfile.ZipFile(archive) as zf:
            members = [m for m in zf.infolist() if m.filename.rsplit("/", 1)[-1] == YJ_FILE]
            if not members:
                raise DownloadError(f"{archive}: lacks {YJ_FILE}")
            with zf.open(members[0]) as stream:
                _extract_member(stream, dest)
    except zipfile.BadZipFile as e:
        raise DownloadError(f"{archive}: not a readable zip archive ({e})") from None
    if not keep_archive:
        archive.unlink()
    return dest


def _safe_relative(name: str) -> bool:
    p = Path(name)
    return bool(name) and not p.is_absolute() and ".." not in p.parts


def download_coco_images(file_names: Iterable[str], images_root: str | os.PathLike, *,
                         base_url: str = COCO_BASE_URL, workers: int = 16, progress: bool = True,
                         retries: int = 2, timeout: float = 60, backoff: float = 1.0) -> dict:
    """Fetch only the COCO images named (``train2014/COCO_train2014_...jpg``) into ``images_root``.

    Parallel (threads); a file already present that decodes is skipped; each download must decode
    with PIL, else it is deleted and fetched again (``retries`` times) and then reported.
    Returns ``{requested, downloaded, skipped_existing, failed: {file_name: reason}}``.
    """
    root = Path(images_root)
    names = sorted(set(file_names))
    counts = {"requested": len(names), "downloaded": 0, "skipped_existing": 0, "failed": {}}

    def decode_problem(path: Path) -> str | None:
        try:
            load_image(path, max_side=64)  # draft decode: reads the whole stream, cheaply
        except ImageLoadError as e:
            return e.reason + (f" ({e.detail})" if e.detail else "")
        return None

    def fetch(name: str) -> tuple[str, str | None]:
        if not _safe_relative(name):
            return "failed", "unsafe file name"
        dest = root / name
        if dest.exists():
            if decode_problem(dest) is None:
                return "skipped_existing", None
            dest.unlink()  # a corrupt leftover: fetch it again
        url = f"{base_url.rstrip('/')}/{urllib.parse.quote(name)}"
        problem = None
        for _ in range(retries + 1):
            try:
                download_file(url, dest, retries=retries, timeout=timeout, progress=False, backoff=backoff)
            except DownloadError as e:
                return "failed", str(e)
            problem = decode_problem(dest)
            if problem is None:
                return "downloaded", None
            dest.unlink(missing_ok=True)
        return "failed", f"does not decode after {retries + 1} download(s): {problem}"

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, \
            tqdm(total=len(names), desc="COCO images", unit="img", disable=not progress) as bar:
        futures = {pool.submit(fetch, n): n for n in names}
        for fut in as_completed(futures):
            status, reason = fut.result()
            if status == "failed":
                counts["failed"][futures[fut]] = reason
            else:
                counts[status] += 1
            bar.update(1)
    counts["failed"] = dict(sorted(counts["failed"].items()))
    return counts


# --------------------------------------------------------------------------- one params file (01_data)

def fetch_raw(params) -> dict:
    """Get the raw annotation files for ``params.data``: generate jp-shapes offline, or (``source:
    stair`` with ``download: true``) fetch STAIR and YJ. COCO images come later, per subset
    (:func:`prepare_from_params`). Returns where everything is."""
    d = params.data
    root = Path(d.root)
    if d.source == "jp-shapes":
        from .toydata import generate_jp_shapes

        summary = generate_jp_shapes(root, n_train=d.toy.n_train, n_val=d.toy.n_val, n_yj=d.toy.n_yj,
                                     yj_train_overlap=d.toy.yj_train_overlap, image_sizes=d.toy.image_sizes,
                                     seed=d.toy.seed)
        return {"source": "jp-shapes", "root": str(root), "files": summary["files"]}
    files = {"stair_train": root / STAIR_TRAIN_FILE, "stair_val": root / STAIR_VAL_FILE}
    if d.use_yj:
        files["yj"] = root / YJ_FILE
    missing = [str(p) for p in files.values() if not p.exists()]
    if missing and not d.download:
        raise DataError(f"missing {', '.join(missing)}: set data.download: true or put the files in {root}")
    if missing:
        download_stair(root)
        if d.use_yj:
            download_yj(root)
    return {"source": "stair", "root": str(root),
            "files": {k: {"path": str(p), "bytes": p.stat().st_size} for k, p in files.items()}}


def prepare_from_params(params, progress: bool = True) -> dict:
    """Clean, split and check the data of ``params`` into ``params.processed_dir``; returns report.json.

    With ``data.download`` on, only the COCO images the chosen splits need are fetched, between a
    first pass that selects them (no image checks) and the final pass that checks them."""
    from .models import load_tokenizer

    d = params.data
    tokenizer = load_tokenizer(params)
    kwargs = dict(
        yj_path=(Path(d.root) / YJ_FILE) if d.use_yj else None, karpathy_path=d.karpathy_json,
        val_size=d.val_size, test_size=d.test_size, train_subset=d.train_subset, val_subset=d.val_subset,
        test_subset=d.test_subset, yj_subset=d.yj_subset, seed=params.run.seed,
        max_caption_tokens=d.max_caption_tokens, tokenizer=tokenizer, progress=progress)
    out_dir = params.processed_dir
    if d.source == "stair" and d.download:
        prepare_dataset(d.root, params.images_dir, out_dir, check_images=False, **kwargs)
        Path(params.images_dir).mkdir(parents=True, exist_ok=True)
        fetched = download_coco_images(split_file_names(out_dir), params.images_dir, progress=progress)
        if fetched["failed"]:
            print(f"{len(fetched['failed'])} COCO images could not be fetched; they are skipped and counted")
    return prepare_dataset(d.root, params.images_dir, out_dir, check_images=True, **kwargs)


def report_tables(report: dict) -> dict:
    """report.json as three tables: split sizes (with hashes), caption changes, skipped items."""
    import pandas as pd

    splits = pd.DataFrame([{"split": name, **info} for name, info in report["splits"].items()])
    yj = report.get("split_info", {}).get("yj")
    if yj:
        splits.attrs["yj_overlap_removed"] = yj.get("overlap_train_removed", 0)
    changes = []
    for source, c in report.get("cleaning", {}).items():
        row = {"source": source, "captions_in": c["captions_in"], "captions_out": c["captions_out"]}
        row.update({k: v for k, v in c.get("normalize", {}).items() if k != "total"})
        row["truncated"] = c.get("truncated", 0)
        row.update({f"dropped: {k}": v for k, v in c.get("dropped", {}).items()})
        changes.append(row)
    skipped = []
    for source, load in report.get("load", {}).items():
        for reason, n in load.get("dropped_captions", {}).items():
            skipped.append({"stage": f"load {source}", "what": "caption", "reason": reason, "count": n})
    for reason, n in report.get("image_checks", {}).get("skipped_by_reason", {}).items():
        skipped.append({"stage": "image check", "what": "image", "reason": reason, "count": n})
    if yj:
        skipped.append({"stage": "yj leak check", "what": "image", "reason": "also a training image",
                        "count": yj.get("overlap_train_removed", 0)})
    return {"splits": splits, "changes": pd.DataFrame(changes).fillna(0),
            "skipped": pd.DataFrame(skipped, columns=["stage", "what", "reason", "count"])}


def caption_statistics(params, top_n: int = 20) -> dict:
    """Caption lengths per split (MeCab words and model tokens) and the most frequent training words."""
    from collections import Counter

    import pandas as pd

    from .models import load_tokenizer
    from .text import segment

    tokenizer = load_tokenizer(params)
    mecab, tokens, words = {}, {}, Counter()
    for split in SPLIT_NAMES:
        path = params.processed_dir / f"{split}.jsonl"
        if not path.exists():
            continue
        caps = [c for r in load_split(path) for c in r.captions]
        segmented = [segment(c) for c in caps]
        mecab[split] = [len(s) for s in segmented]
        tokens[split] = [len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in caps]
        if split == "train":
            words.update(w for s in segmented for w in s)
    top = pd.DataFrame(words.most_common(top_n), columns=["word", "count"])
    return {"mecab_lengths": mecab, "token_lengths": tokens, "top_words": top}


def sample_items(params, split: str = "train", n: int = 8) -> list[tuple[Path, str]]:
    """(image path, first caption) for ``n`` images of a processed split, evenly spread."""
    records = load_split(params.processed_dir / f"{split}.jsonl")
    step = max(1, len(records) // n)
    return [(resolve_image_path(params.images_dir, r.file_name), r.captions[0]) for r in records[::step][:n]]
