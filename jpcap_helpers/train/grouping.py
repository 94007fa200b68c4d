"""Training micro-batches grouped by visual grid (``train.group_by_grid``), like transformers'
``group_by_length``: within windows of the shuffled epoch order, samples are sorted by the visual grid
of their image and the window is cut into micro-batches, whose order within the window is shuffled
again. Micro-batches then mostly hold one grid (less padding, fewer shapes for compiled layers).

The grouped order is a function of (seed, epoch, the samples' grids) only, and a permutation of the
plain epoch order that moves samples only inside their window — so an epoch still sees every sample
once, and the steps after a kill are the uninterrupted run's. The grids are read once from the image
headers when a run starts and saved in its checkpoints (``pair_grids.npy``), so a resume does not
depend on the image files (one may have gone missing since).
"""
from __future__ import annotations

import math
import os
from typing import Any, Optional, Sequence

import numpy as np

from ..data import resolve_image_path

__all__ = ["GROUP_WINDOW_MICRO_BATCHES", "MISSING_GRID", "pair_grids", "sample_grids", "group_window",
           "grouped_order"]

GROUP_WINDOW_MICRO_BATCHES = 50   # a window holds about this many micro-batches (HF's megabatch: 50 batches)
MISSING_GRID = (0, 0)             # an image whose header cannot be read


def pair_grids(pairs: Sequence[dict], images_dir: str | os.PathLike, processor: Any) -> np.ndarray:
    """``(n_pairs, 2)`` int64: the visual grid (height, width after the processor's resize) of each
    pair's image, from the image headers (each file read once); :data:`MISSING_GRID` when unreadable."""
    from ..engine.grids import natural_grid
    from ..engine.images import image_size

    by_file: dict[str, tuple[int, int]] = {}
    out = np.zeros((len(pairs), 2), dtype=np.int64)
    for i, p in enumerate(pairs):
        name = p["file_name"]
        if name not in by_file:
            try:
                h, w = image_size(resolve_image_path(images_dir, name))
                by_file[name] = natural_grid(processor, h, w) or MISSING_GRID
            except Exception:   # missing or unreadable: drawn later as a masked stand-in
                by_file[name] = MISSING_GRID
        out[i] = by_file[name]
    return out


def sample_grids(grids: np.ndarray, samples: Optional[Sequence[Sequence[int]]] = None) -> np.ndarray:
    """The grid of each sample: a pair's own, or a packed sample's image (its first pair's)."""
    if samples is None:
        return grids
    return grids[np.fromiter((s[0] for s in samples), dtype=np.int64, count=len(samples))]


def group_window(effective_batch: int, micro_batch: int) -> int:
    """Samples per grouping window: a multiple of the optimizer step's samples (so windows start at
    step boundaries and micro-batch boundaries stay where they are) of about
    :data:`GROUP_WINDOW_MICRO_BATCHES` micro-batches."""
    return effective_batch * max(1, math.ceil(GROUP_WINDOW_MICRO_BATCHES * micro_batch / effective_batch))


def grouped_order(order: np.ndarray, keys: np.ndarray, micro_batch: int, window: int, seed: int,
                  epoch: int) -> np.ndarray:
    """``order`` with each window of ``window`` consecutive positions sorted by ``keys[sample]`` (rows of
    ``keys`` compared lexicographically; ties keep their shuffled order), cut into micro-batches of
    ``micro_batch`` whose order within the window is shuffled (``rng([seed, epoch, 3])``). A last partial
    window's incomplete micro-batch stays at its end."""
    if window % micro_batch:
        raise ValueError(f"window ({window}) must be a multiple of micro_batch ({micro_batch})")
    order = np.asarray(order, dtype=np.int64)
    keys = np.asarray(keys).reshape(len(keys), -1)
    rng = np.random.default_rng([int(seed), int(epoch), 3])
    out = []
    for start in range(0, len(order), window):
        chunk = order[start:start + window]
        k = keys[chunk]
        chunk = chunk[np.lexsort(tuple(k[:, j] for j in range(k.shape[1] - 1, -1, -1)))]  # stable
        full = len(chunk) // micro_batch
        pieces = [chunk[j * micro_batch:(j + 1) * micro_batch] for j in range(full)]
        out += [pieces[int(j)] for j in rng.permutation(full)]
        if len(chunk) % micro_batch:
            out.append(chunk[full * micro_batch:])
    return np.concatenate(out) if out else order.copy()
