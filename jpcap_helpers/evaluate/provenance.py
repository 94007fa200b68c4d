"""metrics.csv: one row per evaluation with every score, its CI and where it came from (model
revision, adapter, params fingerprint, split hash, git commit, date)."""
from __future__ import annotations

import csv
import io
import json
import math
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..io import atomic_write_text
from .metrics import METRICS

PROVENANCE_COLUMNS = (
    "date", "split", "model_id", "revision", "adapter", "params_hash", "split_hash", "git_commit",
)
SCORE_COLUMNS = ("n_images", "n_missing") + tuple(
    c for m in METRICS for c in (m, f"{m}_lo", f"{m}_hi")
)


def git_commit(cwd: str | Path | None = None) -> str:
    """Short commit hash of the repository holding this package (or ``cwd``); 'unknown' if none."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=str(cwd) if cwd is not None else str(Path(__file__).resolve().parent),
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else "unknown"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def metrics_row(
    result: Mapping[str, Any],
    *,
    model_id: str,
    split: str,
    revision: str = "",
    adapter: str = "",
    params_hash: str = "",
    split_hash: str = "",
    **extra: Any,
) -> dict[str, Any]:
    """Flatten a ``score`` result plus provenance into one metrics.csv row."""
    row: dict[str, Any] = {
        "date": _now(),
        "split": split,
        "model_id": model_id,
        "revision": revision,
        "adapter": adapter or "",
        "params_hash": params_hash,
        "split_hash": split_hash,
        "git_commit": git_commit(),
        "n_images": result["n_images"],
        "n_missing": result.get("n_missing", 0),
    }
    for m in METRICS:
        lo, hi = result.get("ci", {}).get(m, [None, None])
        row[m], row[f"{m}_lo"], row[f"{m}_hi"] = result[m], lo, hi
    row.update(extra)
    return row


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    if isinstance(value, (list, dict, tuple)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def append_metrics_row(csv_path: str | Path, row: Mapping[str, Any]) -> Path:
    """Append one row to metrics.csv without losing earlier rows.

    Existing rows are read back, the columns are the union (existing order, then new ones; a new
    file starts with provenance and score columns), and the whole file is rewritten atomically.
    Missing provenance cells are filled: ``date`` (now, UTC), ``git_commit``; the others empty.
    """
    csv_path = Path(csv_path)
    row = dict(row)
    row.setdefault("date", _now())
    row.setdefault("git_commit", git_commit())
    for col in PROVENANCE_COLUMNS:
        row.setdefault(col, "")
    rows: list[dict[str, str]] = []
    columns: list[str] = []
    if csv_path.exists() and csv_path.stat().st_size > 0:
        with open(csv_path, encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            columns = list(reader.fieldnames or [])
            for lineno, existing in enumerate(reader, start=2):
                if None in existing:
                    raise ValueError(f"{csv_path}: line {lineno} has more cells than the header")
                rows.append({k: (v if v is not None else "") for k, v in existing.items()})
    if not columns:
        preferred = [c for c in (*PROVENANCE_COLUMNS, *SCORE_COLUMNS) if c in row]
        columns = preferred + [c for c in row if c not in preferred]
    else:
        columns += [c for c in row if c not in columns]
    rows.append({k: _cell(v) for k, v in row.items()})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(csv_path, buf.getvalue())


def read_metrics(csv_path: str | Path, latest_only: bool = False):
    """metrics.csv as a pandas DataFrame: provenance columns as strings (empty, not NaN), columns
    whose every non-empty cell is numeric as numbers. ``latest_only`` keeps the last row per
    (model_id, revision, adapter, split)."""
    import pandas as pd

    df = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    for col in df.columns:
        if col in PROVENANCE_COLUMNS:
            continue
        values = df[col]
        non_empty = values[values != ""]
        converted = pd.to_numeric(non_empty, errors="coerce")
        if len(non_empty) and not converted.isna().any():
            df[col] = pd.to_numeric(values.replace("", np.nan), errors="coerce")
    if latest_only and len(df):
        keys = [c for c in ("model_id", "revision", "adapter", "split") if c in df.columns]
        df = df.drop_duplicates(subset=keys, keep="last").reset_index(drop=True)
    return df
