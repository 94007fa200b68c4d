"""The shared vocabulary of the data stage: :class:`ImageRecord`, its errors, file names and split names."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STAIR_TRAIN_FILE = "stair_captions_v1.2_train.json"
STAIR_VAL_FILE = "stair_captions_v1.2_val.json"
YJ_FILE = "yjcaptions26k_clean.json"
COCO_SUBFOLDERS = ("train2014", "val2014")
SPLIT_NAMES = ("train", "val", "test", "yj_test")
EXAMPLES_PER_REASON = 10    # ids kept per reason in report.json


class DataError(ValueError):
    """A captions/split file that cannot be used as a whole (bad JSON, missing key, wrong type)."""


class ImageLoadError(ValueError):
    """An image that cannot be used; ``reason`` is one of ``images.IMAGE_SKIP_REASONS``."""

    def __init__(self, reason: str, path: str | os.PathLike, detail: str = ""):
        self.reason, self.path, self.detail = reason, str(path), detail
        super().__init__(f"{path}: {reason}" + (f" ({detail})" if detail else ""))


class DownloadError(OSError):
    """A download that failed for good (after its retries)."""


@dataclass
class ImageRecord:
    """One image and its captions; ``file_name`` is relative to the COCO image root."""

    image_id: int
    file_name: str
    captions: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"image_id": self.image_id, "file_name": self.file_name, "captions": list(self.captions)}


def as_int(value: Any) -> int | None:
    """An int id (digit strings accepted); None for anything else (bools included)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """The parsed JSON of ``path``; any problem raises one :class:`DataError` naming the file and the fix.

    ``what`` names the file in the messages ("captions file", "Karpathy split file"). A UTF-8 BOM is
    accepted.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {what} not found" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); is this the right file? "
                        f"Re-save it as UTF-8 JSON") from None
    if not text.strip():
        raise DataError(f"{path}: not valid JSON (the file is empty); download or write it again")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); fix that spot "
                        f"or download the file again") from None
