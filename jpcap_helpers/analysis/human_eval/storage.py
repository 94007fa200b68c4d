"""Judgements: validation, kill-safe storage (one JSONL per rater, each judgement appended, flushed
and fsynced) and loading with every bad line counted and named, nothing rewritten.

A judgement (one line)::

    {"sample_id", "item_id", "rater", "left", "right",          # left/right: system names (from the sample)
     "preference": "left" | "right" | "tie",
     "adequacy_left", "adequacy_right", "fluency_left", "fluency_right": 1..5,
     "flags_left", "flags_right": subsets of ["hallucination", "bias", "privacy"],
     "comment": str, "time": ISO time, "source": "widget" | "form"}
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Optional

from ...io import append_jsonl
from .sampling import Sample

__all__ = ["PREFERENCES", "FLAG_CHOICES", "SCORE_FIELDS", "JudgementError", "validate_judgement", "rater_file",
           "RatingStore", "LoadReport", "load_ratings"]

PREFERENCES = ("left", "tie", "right")
FLAG_CHOICES = ("hallucination", "bias", "privacy")
SCORE_FIELDS = ("adequacy_left", "adequacy_right", "fluency_left", "fluency_right")
_RATER_RE = re.compile(r"^[A-Za-z0-9_.-]{1,40}$")


class JudgementError(ValueError):
    """A judgement that cannot be stored; the message names the field and the fix."""


def validate_judgement(row: Mapping[str, Any], sample: Sample, source: str = "widget") -> dict:
    """The judgement as stored (left/right taken from the sample, time added when missing); raises
    :class:`JudgementError` naming the bad field."""
    if not isinstance(row, Mapping):
        raise JudgementError(f"a judgement must be a JSON object, got {type(row).__name__}")
    if row.get("sample_id") != sample.sample_id:
        raise JudgementError(f"sample_id {row.get('sample_id')!r} is not this sample ({sample.sample_id}): "
                             "rate with the sample file the form/widget was made from")
    try:
        item = sample.item(str(row.get("item_id")))
    except KeyError:
        raise JudgementError(f"item_id {row.get('item_id')!r} is not in sample {sample.sample_id}") from None
    rater = row.get("rater")
    if not isinstance(rater, str) or not _RATER_RE.match(rater):
        raise JudgementError(f"rater {rater!r}: use 1-40 letters, digits, '.', '_' or '-' (it names the file)")
    for side in ("left", "right"):
        if side in row and row[side] != item[side]:
            raise JudgementError(f"{side} is {row[side]!r} but the sample shows {item[side]!r} on the {side}")
    pref = row.get("preference")
    if pref not in PREFERENCES:
        raise JudgementError(f"preference must be one of {PREFERENCES}, got {pref!r}")
    out = {"sample_id": sample.sample_id, "item_id": item["item_id"], "rater": rater, "left": item["left"],
           "right": item["right"], "preference": pref}
    for key in SCORE_FIELDS:
        v = row.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 5:
            raise JudgementError(f"{key} must be an integer 1-5, got {v!r}")
        out[key] = v
    for key in ("flags_left", "flags_right"):
        v = row.get(key, [])
        if not isinstance(v, list) or any(f not in FLAG_CHOICES for f in v):
            raise JudgementError(f"{key} must be a list of {FLAG_CHOICES}, got {v!r}")
        out[key] = sorted(set(v))
    comment = row.get("comment", "")
    if not isinstance(comment, str):
        raise JudgementError(f"comment must be text, got {comment!r}")
    out["comment"] = comment[:2000]
    out["time"] = str(row.get("time") or datetime.now(timezone.utc).isoformat(timespec="seconds"))
    out["source"] = str(row.get("source") or source)
    return out


def rater_file(ratings_dir: str | Path, rater: str) -> Path:
    if not _RATER_RE.match(rater or ""):
        raise JudgementError(f"rater {rater!r}: use 1-40 letters, digits, '.', '_' or '-' (it names the file)")
    return Path(ratings_dir) / f"{rater}.jsonl"


class RatingStore:
    """One rater's judgements on one sample: ``<ratings_dir>/<rater>.jsonl``, append-only; resumable
    (:meth:`rated` and :meth:`pending` skip what the file already holds)."""

    def __init__(self, ratings_dir: str | Path, rater: str, sample: Sample):
        self.path = rater_file(ratings_dir, rater)
        self.rater, self.sample = rater, sample

    def rated(self) -> set[str]:
        df, _ = load_ratings(self.path.parent, self.sample, raters=[self.rater], quiet=True)
        return set(df["item_id"]) if len(df) else set()

    def pending(self) -> list[dict]:
        done = self.rated()
        return [it for it in self.sample.items if it["item_id"] not in done]

    def append(self, row: Mapping[str, Any], source: str = "widget") -> dict:
        """Validate and append one judgement (flushed and fsynced before returning)."""
        judgement = validate_judgement({**row, "rater": self.rater, "sample_id": self.sample.sample_id},
                                       self.sample, source)
        append_jsonl(self.path, [judgement])
        return judgement


@dataclass
class LoadReport:
    """What :func:`load_ratings` read: files, lines, and every line it did not use (file:line, why)."""
    n_files: int = 0
    n_lines: int = 0
    n_valid: int = 0
    broken: list[str] = field(default_factory=list)       # not JSON (a kill's partial line, hand edits)
    invalid: list[str] = field(default_factory=list)      # JSON, but not a valid judgement
    other_sample: int = 0                                 # judgements of another sample (kept in the file)
    duplicates: int = 0                                   # a rater's repeated judgement of an item: the last counts

    def summary(self) -> str:
        parts = [f"{self.n_valid} judgements from {self.n_files} rater files ({self.n_lines} lines)"]
        if self.duplicates:
            parts.append(f"{self.duplicates} repeated judgements (the last of each counts)")
        if self.other_sample:
            parts.append(f"{self.other_sample} of another sample ignored")
        for name, rows in (("unreadable", self.broken), ("invalid", self.invalid)):
            if rows:
                parts.append(f"{len(rows)} {name} lines skipped, first: {rows[0]}")
        return "; ".join(parts)


def load_ratings(ratings_dir: str | Path, sample: Sample, raters: Optional[list[str]] = None,
                 quiet: bool = False) -> tuple[Any, LoadReport]:
    """(DataFrame of valid judgements of ``sample``, one per (rater, item), the last one winning;
    :class:`LoadReport`). Broken or invalid lines are skipped and counted with file:line and the
    reason; the files are never rewritten. Prints the report's summary unless ``quiet``."""
    import pandas as pd

    report = LoadReport()
    rows: dict[tuple[str, str], dict] = {}
    files = sorted(Path(ratings_dir).glob("*.jsonl")) if Path(ratings_dir).is_dir() else []
    if raters is not None:
        files = [f for f in files if f.stem in raters]
    for path in files:
        report.n_files += 1
        with open(path, encoding="utf-8", errors="replace") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                report.n_lines += 1
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    report.broken.append(f"{path.name}:{lineno} ({e.msg})")
                    continue
                if isinstance(obj, dict) and obj.get("sample_id") not in (None, sample.sample_id):
                    report.other_sample += 1
                    continue
                try:
                    j = validate_judgement(obj, sample, source=str(obj.get("source") or "file")
                                           if isinstance(obj, dict) else "file")
                except JudgementError as e:
                    report.invalid.append(f"{path.name}:{lineno} ({e})")
                    continue
                if j["rater"] != path.stem:
                    report.invalid.append(f"{path.name}:{lineno} (rater {j['rater']!r} in {path.name}: "
                                          "each rater writes only their own file)")
                    continue
                key = (j["rater"], j["item_id"])
                if key in rows:
                    report.duplicates += 1
                rows[key] = j
    report.n_valid = len(rows)
    if not quiet and (report.n_files or report.broken):
        print(f"ratings in {ratings_dir}: {report.summary()}")
    columns = ["sample_id", "item_id", "rater", "left", "right", "preference", *SCORE_FIELDS, "flags_left",
               "flags_right", "comment", "time", "source"]
    return pd.DataFrame(list(rows.values()), columns=columns), report
