"""What training reports: ``train_log.jsonl`` (one row per optimizer step), TensorBoard scalars, the
progress bar, and the :class:`TrainResult` that :func:`~jpcap_helpers.train.train` returns."""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..io import append_jsonl, atomic_write_jsonl, read_jsonl, repair_jsonl_tail

__all__ = ["LOG_FLUSH_EVERY", "LOG_COLUMNS", "TrainResult", "read_train_log", "truncate_log", "StepLog"]

LOG_FLUSH_EVERY = 10             # train_log.jsonl rows are buffered this many steps (and at evals/saves)
LOG_COLUMNS = ["step", "epoch", "loss", "lr", "grad_norm", "samples_per_s", "val_loss", "val_CIDEr", "skipped"]
_SCALARS = ("loss", "lr", "grad_norm", "samples_per_s", "captions_per_s", "val_loss", "val_CIDEr")


@dataclass
class TrainResult:
    """What :func:`~jpcap_helpers.train.train` returns (also written to ``<run_dir>/train_result.json``)."""
    adapter_dir: str
    steps: int
    total_steps: int
    final_train_loss: Optional[float]
    final_val_loss: Optional[float]
    final_val_cider: Optional[float]
    seconds: float
    peak_memory_gib: Optional[float]
    peak_memory_kind: str
    trainable_params: int
    non_finite_steps_skipped: int
    resumed_from_step: int = 0
    losses: dict[int, float] = field(default_factory=dict)   # step → train loss of the steps run now
    skipped_pairs: dict[str, int] = field(default_factory=dict)
    merged_dir: Optional[str] = None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["losses"] = {str(k): v for k, v in self.losses.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainResult":
        return cls(**{**d, "losses": {int(k): v for k, v in d.get("losses", {}).items()}})


def read_train_log(run_dir: str | os.PathLike) -> Any:
    """``<run_dir>/train_log.jsonl`` as a DataFrame, one row per optimizer step (the last record of a
    step wins, so rows re-done after a resume replace the killed run's)."""
    import pandas as pd

    path = Path(run_dir) / "train_log.jsonl"
    if not path.exists():
        return pd.DataFrame(columns=LOG_COLUMNS)
    rows = list(read_jsonl(path, tolerate_partial_last=True))
    if not rows:
        return pd.DataFrame(columns=LOG_COLUMNS)
    df = pd.DataFrame(rows).drop_duplicates("step", keep="last").sort_values("step").reset_index(drop=True)
    for c in LOG_COLUMNS:
        if c not in df:
            df[c] = np.nan
    return df[LOG_COLUMNS + [c for c in df.columns if c not in LOG_COLUMNS]]


def truncate_log(path: Path, last_step: int) -> None:
    """Drop log rows of steps after ``last_step`` (written by a killed run after its last checkpoint)."""
    if not path.exists():
        return
    repair_jsonl_tail(path)
    rows = [r for r in read_jsonl(path, tolerate_partial_last=True) if r.get("step", 0) <= last_step]
    atomic_write_jsonl(path, rows)


class StepLog:
    """``train_log.jsonl`` (buffered), TensorBoard and the progress bar; writes only where ``enabled``
    (the main process)."""

    def __init__(self, run_dir: Path, start_step: int, total_steps: int, enabled: bool):
        from tqdm.auto import tqdm

        self.path, self.enabled, self.pending = Path(run_dir) / "train_log.jsonl", enabled, []
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"),
                                        purge_step=start_step + 1 if start_step else None)
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", disable=not enabled, dynamic_ncols=True)

    def add(self, row: dict, flush: bool = False) -> None:
        """Record one step's row; written to disk every :data:`LOG_FLUSH_EVERY` rows or when ``flush``."""
        if not self.enabled:
            return
        self.pending.append(row)
        for k in _SCALARS:
            v = row.get(k)
            if v is not None and not (isinstance(v, float) and math.isnan(v)):
                self.writer.add_scalar(f"val/{k[4:]}" if k.startswith("val") else f"train/{k}", v, row["step"])
        if flush or len(self.pending) >= LOG_FLUSH_EVERY:
            self.flush()
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{row['loss']:.4f}", sps=f"{row['samples_per_s']:.1f}")

    def flush(self) -> None:
        if self.enabled and self.pending:
            append_jsonl(self.path, self.pending)
            self.pending.clear()

    def close(self) -> None:
        self.flush()
        self.bar.close()
        if self.writer is not None:
            self.writer.close()
