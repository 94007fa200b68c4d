"""Canonical visual grids (``generation.grid_buckets``): K grids chosen from a split's image sizes, and
each image moved to the nearest one, so that a captioning run meets at most K visual grids (the fast
decoder compiles and captures per shape; a one-shot run over COCO's mix of sizes meets dozens).

A *grid* is the pixel size ``(height, width)`` the Qwen image processor resizes an image to (its
``smart_resize``: multiples of patch × merge, within ``min_pixels``/``max_pixels``); it fixes the number
of visual tokens. The K canonical grids are weighted medoids of the split's grids under the distance
``|log(h/h')| + |log(w/w')|`` (aspect change and scale change alike), so most images keep their own
grid and the rest move to the grid whose shape is closest. A moved image is resized to exactly the
canonical size before the processor sees it (the processor then leaves it as it is): its aspect ratio
changes by at most the distance to its canonical grid (:attr:`GridPlan.max_distortion`).
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from .images import group_key, image_size, resolve_image

__all__ = ["Grid", "natural_grid", "grid_distance", "choose_grids", "GridPlan", "plan_grids"]

Grid = tuple[int, int]   # (height, width) in pixels after the processor's resize
MAX_SWAP_PASSES = 20     # k-medoids swap passes (each improves the cost; it stops earlier when none does)


def natural_grid(processor: Any, height: int, width: int) -> Optional[Grid]:
    """The grid the processor gives a ``height`` × ``width`` image; None for processors without grids."""
    key = group_key(processor, height, width)
    return (int(key[1]), int(key[2])) if len(key) == 3 else None


def grid_distance(a: Grid, b: Grid) -> float:
    """``|log(h_a/h_b)| + |log(w_a/w_b)|``: 0 for the same grid; aspect and scale changes both count."""
    return abs(math.log(a[0] / b[0])) + abs(math.log(a[1] / b[1]))


def choose_grids(counts: Mapping[Grid, int], k: int) -> list[Grid]:
    """At most ``k`` canonical grids for grids seen ``counts`` times: weighted k-medoids (greedy build,
    then swaps while one lowers the total distance). Deterministic: candidates are visited most frequent
    first, ties broken by the grid itself. Sorted by (height, width)."""
    import numpy as np

    if k < 1:
        raise ValueError(f"k must be ≥ 1, got {k}")
    grids = sorted(counts, key=lambda g: (-counts[g], g))
    if len(grids) <= k:
        return sorted(grids)
    logs = np.log(np.asarray(grids, dtype=np.float64))
    dist = np.abs(logs[:, None, :] - logs[None, :, :]).sum(-1)   # dist[g, c] = grid_distance(g, c)
    weight = np.asarray([counts[g] for g in grids], dtype=np.float64)

    def cost(medoids: list[int]) -> float:
        return float(weight @ dist[:, medoids].min(1))

    medoids: list[int] = []
    for _ in range(k):  # greedy build: add the grid that lowers the cost most (first one on a tie)
        rest = [c for c in range(len(grids)) if c not in medoids]
        medoids.append(min(rest, key=lambda c: cost(medoids + [c])))
    best = cost(medoids)
    for _ in range(MAX_SWAP_PASSES):
        improved = False
        for i in range(k):
            for c in range(len(grids)):
                if c in medoids:
                    continue
                trial = medoids[:i] + [c] + medoids[i + 1:]
                trial_cost = cost(trial)
                if trial_cost < best - 1e-9:
                    medoids, best, improved = trial, trial_cost, True
        if not improved:
            break
    return sorted(grids[m] for m in medoids)


@dataclass(frozen=True)
class GridPlan:
    """The canonical grids of a run and the rule that maps a grid to one of them."""
    grids: tuple[Grid, ...]

    def target(self, grid: Grid) -> Grid:
        """The canonical grid nearest to ``grid`` (itself when canonical; ties: the first in order)."""
        if grid in self.grids:
            return grid
        return min(self.grids, key=lambda c: (grid_distance(grid, c), c))

    def max_distortion(self, grids: Iterable[Grid]) -> float:
        """The largest aspect-ratio change (as ``|log|`` of the ratio of ratios) over ``grids``."""
        worst = 0.0
        for g in grids:
            t = self.target(g)
            worst = max(worst, abs(math.log((g[1] / g[0]) / (t[1] / t[0]))))
        return worst

    def as_list(self) -> list[list[int]]:
        return [list(g) for g in self.grids]


def plan_grids(processor: Any, records: Iterable[Any], images_dir: str | Path, k: int) -> Optional[GridPlan]:
    """The :class:`GridPlan` of ``records`` (every record's image header is read; unreadable ones are
    left out); None when ``k`` is 0 or the processor has no grids (non-Qwen families)."""
    if k <= 0:
        return None
    counts: Counter = Counter()
    for rec in records:
        name = rec.get("file_name") if isinstance(rec, Mapping) else getattr(rec, "file_name", None)
        if not isinstance(name, str):
            continue
        try:
            h, w = image_size(resolve_image(images_dir, name))
        except Exception:  # missing or unreadable: the run reports it as an error row
            continue
        grid = natural_grid(processor, h, w)
        if grid is None:
            return None
        counts[grid] += 1
    if not counts:
        return None
    return GridPlan(tuple(choose_grids(counts, k)))
