"""Reading references and predictions for evaluation; every error names the file and the line."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Iterator

MAX_IDS_SHOWN = 20


class EvaluationError(ValueError):
    """Bad evaluation input (files, image coverage); the message names the file/ids."""


class Predictions(dict):
    """``{image_id: caption}`` as read from a predictions file, with ``n_duplicate_rows``: rows that
    repeated an earlier image id with the same caption (counted, not scored twice)."""

    def __init__(self, *args: Any, n_duplicate_rows: int = 0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.n_duplicate_rows = n_duplicate_rows


def ids_preview(ids: Iterable[int]) -> str:
    """The first 20 ids, sorted, and how many there are: ``"4, 5, 6 (3 in total)"``."""
    ids = sorted(ids)
    shown = ", ".join(str(i) for i in ids[:MAX_IDS_SHOWN])
    more = f", ... ({len(ids)} in total)" if len(ids) > MAX_IDS_SHOWN else f" ({len(ids)} in total)"
    return shown + more


def _check_image_id(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise EvaluationError(f"{where}: image_id must be an integer, got {value!r}")
    return value


def _not_utf8(path: Path, data: bytes, err: UnicodeDecodeError, lineno: int | None = None) -> EvaluationError:
    """An error naming the line (counted from ``data`` when not given) of undecodable bytes."""
    if lineno is None:
        lineno = data.count(b"\n", 0, err.start) + 1
    bad = data[err.start:err.end].hex(" ")
    return EvaluationError(f"{path}: line {lineno} is not valid UTF-8 (bytes {bad}): save the file as UTF-8")


def read_json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed value)`` for every non-blank line of a JSON-lines file."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _not_utf8(path, raw, e, lineno) from None
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise EvaluationError(f"{path}: line {lineno} is not valid JSON ({e.msg})") from None


def _references_from_jsonl(path: Path) -> dict[int, list[str]]:
    refs: dict[int, list[str]] = {}
    first_line: dict[int, int] = {}
    for lineno, row in read_json_lines(path):
        where = f"{path}: line {lineno}"
        if not isinstance(row, dict) or "image_id" not in row or "captions" not in row:
            raise EvaluationError(f"{where}: expected an object with 'image_id' and 'captions'")
        image_id = _check_image_id(row["image_id"], where)
        captions = row["captions"]
        if not isinstance(captions, list) or not captions or not all(isinstance(c, str) for c in captions):
            raise EvaluationError(f"{where}: 'captions' must be a non-empty list of strings")
        if image_id in refs:
            raise EvaluationError(
                f"{where}: duplicate image_id {image_id} (first on line {first_line[image_id]})"
            )
        refs[image_id] = list(captions)
        first_line[image_id] = lineno
    return refs


def _references_from_coco(path: Path, data: dict) -> dict[int, list[str]]:
    annotations = data.get("annotations")
    if not isinstance(annotations, list):
        raise EvaluationError(f"{path}: COCO captions JSON needs an 'annotations' list")
    known: set[int] | None = None
    if isinstance(data.get("images"), list):
        known = set()
        for i, img in enumerate(data["images"]):
            if not isinstance(img, dict) or "id" not in img:
                raise EvaluationError(f"{path}: images[{i}] has no 'id'")
            known.add(_check_image_id(img["id"], f"{path}: images[{i}]"))
    refs: dict[int, list[str]] = defaultdict(list)
    for i, ann in enumerate(annotations):
        where = f"{path}: annotations[{i}]"
        if not isinstance(ann, dict) or "image_id" not in ann or not isinstance(ann.get("caption"), str):
            raise EvaluationError(f"{where}: expected an object with 'image_id' and a string 'caption'")
        image_id = _check_image_id(ann["image_id"], where)
        if known is not None and image_id not in known:
            raise EvaluationError(f"{where}: image_id {image_id} is not in 'images'")
        refs[image_id].append(ann["caption"])
    if not refs:
        raise EvaluationError(f"{path}: no annotations")
    return dict(refs)


def load_references(path: str | Path) -> dict[int, list[str]]:
    """Reference captions per image from a COCO-format captions JSON (``images``, ``annotations``
    with ``image_id``/``caption``) or a processed ``<split>.jsonl`` (``{"image_id", "file_name",
    "captions": [...]}`` per line). Images listed in COCO ``images`` without captions are left out.
    """
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"{path}: references file not found")
    if path.suffix == ".jsonl":
        return _references_from_jsonl(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _not_utf8(path, raw, e) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return _references_from_jsonl(path)  # JSON lines under another suffix (errors name the line)
    if isinstance(data, dict) and "annotations" in data:
        return _references_from_coco(path, data)
    if isinstance(data, dict) and "captions" in data:  # a one-line JSONL file
        return _references_from_jsonl(path)
    raise EvaluationError(f"{path}: neither a COCO captions JSON nor a JSONL of {{image_id, captions}}")


def load_predictions(path: str | Path) -> Predictions:
    """Predictions ``{image_id: caption}`` from JSONL ``{"image_id": int, "caption": str, ...}``.

    A row with an ``"error"`` key and no (or a null) caption is an empty prediction (scores 0).
    A repeated image_id is accepted only with the same caption and counted in ``n_duplicate_rows``
    of the returned :class:`Predictions`; a different caption is an EvaluationError naming both
    lines. Malformed or non-UTF-8 lines raise EvaluationError naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"{path}: predictions file not found")
    preds = Predictions()
    seen_on: dict[int, int] = {}
    for lineno, row in read_json_lines(path):
        where = f"{path}: line {lineno}"
        if not isinstance(row, dict) or "image_id" not in row:
            raise EvaluationError(f"{where}: expected an object with 'image_id' and 'caption'")
        image_id = _check_image_id(row["image_id"], where)
        caption = row.get("caption")
        if caption is None:
            if "error" not in row:
                raise EvaluationError(f"{where}: no 'caption' (and no 'error') for image_id {image_id}")
            caption = ""
        if not isinstance(caption, str):
            raise EvaluationError(f"{where}: 'caption' must be a string, got {type(caption).__name__}")
        if image_id in preds:
            if preds[image_id] != caption:
                raise EvaluationError(f"{where}: image_id {image_id} repeated with a different caption "
                                      f"(first on line {seen_on[image_id]})")
            preds.n_duplicate_rows += 1
            continue
        preds[image_id] = caption
        seen_on[image_id] = lineno
    return preds
