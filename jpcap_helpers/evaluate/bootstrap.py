"""Percentile bootstrap CIs over images and the paired bootstrap test of two systems.

BLEU replicates come from resampled sufficient statistics (corpus BLEU recomputed exactly), ROUGE-L
and CIDEr replicates are means of resampled per-image scores. Vectorised: a (resamples × images)
count matrix multiplies the per-image arrays.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .loaders import EvaluationError, ids_preview
from .metrics import BLEU_N, MEAN_METRICS, METRICS, corpus_bleu_from_stats


def resample_weights(n_items: int, n_resamples: int, seed: int, chunk: int = 250) -> Iterable[np.ndarray]:
    """Yield (chunk, n_items) arrays: how often each item is drawn in each bootstrap resample."""
    rng = np.random.default_rng(seed)
    done = 0
    while done < n_resamples:
        b = min(chunk, n_resamples - done)
        draws = rng.integers(0, n_items, size=(b, n_items))
        flat = draws + (np.arange(b)[:, None] * n_items)
        yield np.bincount(flat.ravel(), minlength=b * n_items).reshape(b, n_items).astype(np.float64)
        done += b


def bootstrap_samples(
    per_image: Mapping[str, np.ndarray], bleu_stats: np.ndarray, n_resamples: int, seed: int
) -> dict[str, np.ndarray]:
    """Bootstrap replicates of every corpus metric: BLEU from resampled sufficient statistics,
    ROUGE-L and CIDEr as means of resampled per-image scores."""
    n_items = bleu_stats.shape[0]
    out: dict[str, list[np.ndarray]] = {m: [] for m in METRICS}
    for weights in resample_weights(n_items, n_resamples, seed):
        bleus = corpus_bleu_from_stats(weights @ bleu_stats)
        for k in range(BLEU_N):
            out[f"BLEU-{k + 1}"].append(bleus[:, k])
        for m in MEAN_METRICS:
            out[m].append(weights @ per_image[m] / n_items)
    return {m: np.concatenate(v) if v else np.empty(0) for m, v in out.items()}


def percentile_ci(samples: Mapping[str, np.ndarray], level: float) -> dict[str, list[float]]:
    """``{metric: [lo, hi]}``: the central ``level`` percentile interval of each metric's replicates."""
    tail = (1 - level) / 2 * 100
    return {m: [float(v) for v in np.percentile(samples[m], [tail, 100 - tail])] for m in METRICS}


def per_image_arrays(per_image: Sequence[Mapping[str, Any]]) -> tuple[list[int], dict[str, np.ndarray], np.ndarray]:
    """(image ids, ``{ROUGE-L, CIDEr: array}``, BLEU statistics matrix) of ``score()['per_image']``."""
    ids = [int(r["image_id"]) for r in per_image]
    arrays = {m: np.array([float(r[m]) for r in per_image]) for m in MEAN_METRICS}
    stats = np.array([r["bleu_stats"] for r in per_image], dtype=np.float64).reshape(len(per_image), -1)
    return ids, arrays, stats


def bootstrap_ci(
    per_image: Sequence[Mapping[str, Any]], n_resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, list[float]]:
    """Percentile bootstrap CIs over images for every metric (``per_image`` as in ``score``)."""
    _, arrays, stats = per_image_arrays(per_image)
    return percentile_ci(bootstrap_samples(arrays, stats, n_resamples, seed), level)


def _point_scores(arrays: Mapping[str, np.ndarray], stats: np.ndarray) -> dict[str, float]:
    return {**dict(zip(METRICS[:BLEU_N], corpus_bleu_from_stats(stats.sum(0)))),
            **{m: arrays[m].mean() for m in MEAN_METRICS}}


def paired_bootstrap(
    result_a: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    result_b: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, dict[str, Any]]:
    """Paired bootstrap comparison of two systems scored on the same images.

    ``result_a``/``result_b`` are ``score`` results (or their ``per_image`` lists). Both are
    resampled with the same image draws; BLEU is recomputed from resampled sufficient statistics,
    ROUGE-L and CIDEr are means of per-image scores. Returns, per metric: ``a``, ``b``, ``diff``
    (a - b on the full set), ``ci`` (percentile CI of the resampled difference) and ``p_value``
    (two-sided, null-centred: share of resamples with |d* - diff| >= |diff|, with +1 smoothing).
    Raises EvaluationError when the image sets differ.
    """
    per_a = result_a["per_image"] if isinstance(result_a, Mapping) else result_a
    per_b = result_b["per_image"] if isinstance(result_b, Mapping) else result_b
    ids_a, arr_a, stats_a = per_image_arrays(per_a)
    ids_b, arr_b, stats_b = per_image_arrays(per_b)
    if set(ids_a) != set(ids_b) or len(ids_a) != len(ids_b):
        only_a, only_b = set(ids_a) - set(ids_b), set(ids_b) - set(ids_a)
        raise EvaluationError(
            "paired comparison needs the same images: "
            + (f"only in A: {ids_preview(only_a)}; " if only_a else "")
            + (f"only in B: {ids_preview(only_b)}" if only_b else "duplicate image ids")
        )
    order_b = {image_id: j for j, image_id in enumerate(ids_b)}
    perm = np.array([order_b[i] for i in ids_a], dtype=np.int64)
    arr_b = {m: v[perm] for m, v in arr_b.items()}
    stats_b = stats_b[perm]

    point_a, point_b = _point_scores(arr_a, stats_a), _point_scores(arr_b, stats_b)
    samples_a = bootstrap_samples(arr_a, stats_a, n_resamples, seed)
    samples_b = bootstrap_samples(arr_b, stats_b, n_resamples, seed)  # same seed -> same draws
    diffs = {m: samples_a[m] - samples_b[m] for m in METRICS}
    cis = percentile_ci(diffs, level)
    out: dict[str, dict[str, Any]] = {}
    for m in METRICS:
        diff = float(point_a[m] - point_b[m])
        extreme = int(np.sum(np.abs(diffs[m] - diff) >= abs(diff) - 1e-12))
        out[m] = {
            "a": float(point_a[m]),
            "b": float(point_b[m]),
            "diff": diff,
            "ci": cis[m],
            "p_value": (extreme + 1) / (n_resamples + 1),
        }
    return out
