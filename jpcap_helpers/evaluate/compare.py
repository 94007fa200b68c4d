"""Several runs side by side (notebook 04's last table): e.g. Qwen2-VL-2B fine-tuned by
``params/colab_t4.yaml`` next to Qwen3-VL-2B fine-tuned by ``params/colab_t4_qwen3.yaml`` — each run's
latest metrics.csv rows in one table, with a check that every run scored the same images."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional, Sequence

from .loaders import EvaluationError
from .provenance import read_metrics
from .runs import results_table

__all__ = ["compare_runs", "sibling_runs"]


def sibling_runs(run_dir: str | Path, names: Iterable[str]) -> list[Path]:
    """``run_dir`` and the runs named in ``names`` beside it (same output folder). A name must be a
    plain folder name: a path (``a/b``, ``../x``, absolute) is refused, so nothing outside the output
    folder is read."""
    run_dir = Path(run_dir)
    out = [run_dir]
    for name in names:
        name = str(name)
        if not name or name in (".", "..") or "/" in name or "\\" in name or Path(name).is_absolute():
            raise EvaluationError(f"compare_with: {name!r} is not a run name — give the run folder's name as it "
                                  f"stands in {run_dir.parent} (e.g. 'colab_t4_qwen3'), not a path")
        out.append(run_dir.parent / name)
    return out


def _run_metrics(run_dir: Path, splits: Optional[Sequence[str]]):
    csv_path = run_dir / "metrics.csv"
    if not csv_path.exists():
        raise EvaluationError(f"{csv_path}: no metrics for run {run_dir.name!r} — run 04 (evaluate) for that "
                              "run first, or check the run name and the output folder")
    df = read_metrics(csv_path, latest_only=True)
    if splits is not None:
        df = df[df["split"].isin(list(splits))]
    return df.assign(run=run_dir.name)


def compare_runs(run_dirs: Iterable[str | Path], splits: Optional[Sequence[str]] = None):
    """One results table over ``run_dirs`` (each a run folder holding a metrics.csv): the columns of
    :func:`~jpcap_helpers.evaluate.results_table` plus ``Run`` and ``same images`` — False where a run
    scored another version of a split (its ``split_hash`` differs from the first run's), whose numbers
    are then not comparable. Rows are sorted by split, then CIDEr (best first)."""
    import pandas as pd

    dirs = [Path(d) for d in run_dirs]
    if not dirs:
        raise EvaluationError("compare_runs: no run folders given")
    frames = [_run_metrics(d, splits) for d in dirs]
    metrics = pd.concat(frames, ignore_index=True)
    if metrics.empty:
        raise EvaluationError(f"no metrics for splits {list(splits or [])} in runs {[d.name for d in dirs]}")
    reference = {}
    for _, row in metrics.iterrows():          # the first run that scored a split sets its version
        reference.setdefault(row["split"], row.get("split_hash", ""))
    same = [row.get("split_hash", "") == reference[row["split"]] for _, row in metrics.iterrows()]
    metrics = metrics.assign(_same=same).sort_values(["split", "CIDEr"], ascending=[True, False], kind="stable")
    table = results_table(metrics.reset_index(drop=True))
    table.insert(0, "Run", metrics["run"].tolist())
    table["same images"] = metrics["_same"].tolist()
    if not all(same):
        bad = sorted({f"{r} ({s})" for r, s, ok in zip(metrics["run"], metrics["split"], same) if not ok})
        print(f"note: {', '.join(bad)} scored other images than the first run on that split: "
              "not comparable (prepare both runs from the same data folder)")
    return table
