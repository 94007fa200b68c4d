"""Japanese caption evaluation: BLEU-1..4, ROUGE-L, CIDEr-D with bootstrap CIs; ``jpcap evaluate``.

Pipeline (docs/evaluation.md): references and predictions go through
:func:`jpcap_helpers.text.normalize_caption`, are segmented with MeCab/unidic-lite
(:func:`jpcap_helpers.text.segment`, which drops 補助記号 and whitespace), joined with single
spaces, and scored by pycocoevalcap's ``Bleu(4)``, ``Rouge()`` and ``Cider()`` directly
(pycocoevalcap's PTBTokenizer cannot segment Japanese; METEOR and SPICE are English-only).

Scales: BLEU and ROUGE-L in [0, 1]; CIDEr as pycocoevalcap reports it (not x100).
"""
from __future__ import annotations

import argparse
import csv
import io as _stdio
import json
import math
import subprocess
import sys
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from jpcap_helpers.io import atomic_write_json, atomic_write_text
from jpcap_helpers.text import normalize_caption, segment

__all__ = [
    "METRICS",
    "EvaluationError",
    "tokenize_for_eval",
    "load_references",
    "load_predictions",
    "bleu_sufficient_stats",
    "corpus_bleu_from_stats",
    "score",
    "bootstrap_ci",
    "paired_bootstrap",
    "format_table",
    "git_commit",
    "metrics_row",
    "append_metrics_row",
    "read_metrics",
    "add_evaluate_arguments",
    "run_evaluate",
]

METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr")
PER_IMAGE_METRICS = ("BLEU-4", "ROUGE-L", "CIDEr")
BLEU_N = 4
# Column layout of one image's BLEU sufficient statistics (see bleu_sufficient_stats).
BLEU_STATS_COLUMNS = (
    ("testlen", "reflen")
    + tuple(f"guess{k}" for k in range(1, BLEU_N + 1))
    + tuple(f"correct{k}" for k in range(1, BLEU_N + 1))
)
# pycocoevalcap BleuScorer constants (bleu_scorer.py, compute_score).
_BLEU_SMALL = 1e-9
_BLEU_TINY = 1e-15
_MAX_IDS_SHOWN = 20


class EvaluationError(ValueError):
    """Bad evaluation input (files, image coverage); the message names the file/ids."""


# --------------------------------------------------------------------------- tokenisation


def tokenize_for_eval(text: str) -> str:
    """Normalise, segment (MeCab surface forms without 補助記号) and join with single spaces."""
    return " ".join(segment(normalize_caption(text)))


# --------------------------------------------------------------------------- loading


def _ids_preview(ids: Iterable[int]) -> str:
    ids = sorted(ids)
    shown = ", ".join(str(i) for i in ids[:_MAX_IDS_SHOWN])
    more = f", ... ({len(ids)} in total)" if len(ids) > _MAX_IDS_SHOWN else f" ({len(ids)} in total)"
    return shown + more


def _check_image_id(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise EvaluationError(f"{where}: image_id must be an integer, got {value!r}")
    return value


def _read_json_lines(path: Path) -> Iterable[tuple[int, Any]]:
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise EvaluationError(f"{path}: line {lineno} is not valid JSON ({e.msg})") from None


def _references_from_jsonl(path: Path) -> dict[int, list[str]]:
    refs: dict[int, list[str]] = {}
    first_line: dict[int, int] = {}
    for lineno, row in _read_json_lines(path):
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
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError:
        return _references_from_jsonl(path)  # JSON lines under another suffix (errors name the line)
    if isinstance(data, dict) and "annotations" in data:
        return _references_from_coco(path, data)
    if isinstance(data, dict) and "captions" in data:  # a one-line JSONL file
        return _references_from_jsonl(path)
    raise EvaluationError(f"{path}: neither a COCO captions JSON nor a JSONL of {{image_id, captions}}")


def load_predictions(path: str | Path) -> dict[int, str]:
    """Predictions ``{image_id: caption}`` from JSONL ``{"image_id": int, "caption": str, ...}``.

    A row with an ``"error"`` key and no (or a null) caption is an empty prediction (scores 0).
    A repeated image_id is accepted only with the same caption; otherwise ValueError naming both
    lines. Malformed lines raise ValueError naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"{path}: predictions file not found")
    preds: dict[int, str] = {}
    seen_on: dict[int, int] = {}
    for lineno, row in _read_json_lines(path):
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
        if image_id in preds and preds[image_id] != caption:
            raise EvaluationError(
                f"{where}: image_id {image_id} repeated with a different caption (first on line {seen_on[image_id]})"
            )
        preds[image_id] = caption
        seen_on.setdefault(image_id, lineno)
    return preds


# --------------------------------------------------------------------------- BLEU statistics


def _ngram_counts(words: Sequence[str], n: int = BLEU_N) -> dict[tuple[str, ...], int]:
    counts: dict[tuple[str, ...], int] = defaultdict(int)
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i : i + k])] += 1
    return counts


def bleu_sufficient_stats(hypothesis: str, references: Sequence[str], n: int = BLEU_N) -> list[int]:
    """One image's BLEU statistics exactly as pycocoevalcap's BleuScorer (option 'closest') uses them.

    Returns ``[testlen, reflen, guess_1..guess_n, correct_1..correct_n]`` for space-tokenised
    strings: ``correct_k`` = hypothesis k-grams clipped by their maximum count in any single
    reference, ``guess_k`` = max(0, testlen - k + 1), ``reflen`` = the reference length closest
    to ``testlen`` (ties -> the shorter).
    """
    ref_lens = []
    max_counts: dict[tuple[str, ...], int] = {}
    for ref in references:
        words = ref.split()
        ref_lens.append(len(words))
        for ngram, count in _ngram_counts(words, n).items():
            max_counts[ngram] = max(max_counts.get(ngram, 0), count)
    hyp_words = hypothesis.split()
    testlen = len(hyp_words)
    reflen = min((abs(length - testlen), length) for length in ref_lens)[1]
    guess = [max(0, testlen - k + 1) for k in range(1, n + 1)]
    correct = [0] * n
    for ngram, count in _ngram_counts(hyp_words, n).items():
        correct[len(ngram) - 1] += min(max_counts.get(ngram, 0), count)
    return [testlen, reflen, *guess, *correct]


def corpus_bleu_from_stats(stat_sums: np.ndarray, n: int = BLEU_N) -> np.ndarray:
    """Corpus BLEU-1..n from summed sufficient statistics, pycocoevalcap's formula exactly.

    ``stat_sums`` has shape ``(..., 2 + 2n)`` (columns as :data:`BLEU_STATS_COLUMNS`); returns
    shape ``(..., n)``. BLEU-k = (prod_{j<=k} (correct_j + 1e-15) / (guess_j + 1e-9))^(1/k),
    times exp(1 - 1/ratio) when ratio = (testlen + 1e-15) / (reflen + 1e-9) < 1.
    """
    s = np.asarray(stat_sums, dtype=np.float64)
    testlen, reflen = s[..., 0], s[..., 1]
    guess, correct = s[..., 2 : 2 + n], s[..., 2 + n : 2 + 2 * n]
    precisions = np.cumprod((correct + _BLEU_TINY) / (guess + _BLEU_SMALL), axis=-1)
    bleus = precisions ** (1.0 / np.arange(1, n + 1))
    ratio = (testlen + _BLEU_TINY) / (reflen + _BLEU_SMALL)
    with np.errstate(over="ignore", under="ignore"):
        brevity = np.where(ratio < 1, np.exp(1 - 1 / np.minimum(ratio, 1.0)), 1.0)
    return bleus * brevity[..., None]


# --------------------------------------------------------------------------- scoring


def _prepare(
    references: Mapping[int, Sequence[str]], predictions: Mapping[int, str], allow_missing: bool
) -> tuple[list[int], list[int], dict[int, list[str]], dict[int, list[str]], int]:
    unknown = set(predictions) - set(references)
    if unknown:
        raise EvaluationError(f"predictions for image ids not in the references: {_ids_preview(unknown)}")
    missing = sorted(set(references) - set(predictions))
    if missing and not allow_missing:
        raise EvaluationError(
            f"{len(missing)} reference images have no prediction: {_ids_preview(missing)} "
            "(use --allow-missing to score the covered images only)"
        )
    ids = sorted(predictions)
    if not ids:
        raise EvaluationError("no predictions to score")
    gts: dict[int, list[str]] = {}
    res: dict[int, list[str]] = {}
    n_refs_dropped = 0
    for image_id in ids:
        refs = [tokenize_for_eval(r) for r in references[image_id]]
        kept = [r for r in refs if r]
        n_refs_dropped += len(refs) - len(kept)
        if not kept:
            raise EvaluationError(
                f"image_id {image_id}: every reference caption is empty after normalisation/segmentation"
            )
        gts[image_id] = kept
        res[image_id] = [tokenize_for_eval(predictions[image_id])]
    return ids, missing, gts, res, n_refs_dropped


def _resample_weights(n_items: int, n_resamples: int, seed: int, chunk: int = 250) -> Iterable[np.ndarray]:
    """Yield (chunk, n_items) arrays: how often each item is drawn in each bootstrap resample."""
    rng = np.random.default_rng(seed)
    done = 0
    while done < n_resamples:
        b = min(chunk, n_resamples - done)
        draws = rng.integers(0, n_items, size=(b, n_items))
        flat = draws + (np.arange(b)[:, None] * n_items)
        yield np.bincount(flat.ravel(), minlength=b * n_items).reshape(b, n_items).astype(np.float64)
        done += b


def _bootstrap_samples(
    per_image: Mapping[str, np.ndarray], bleu_stats: np.ndarray, n_resamples: int, seed: int
) -> dict[str, np.ndarray]:
    """Bootstrap replicates of every corpus metric: BLEU from resampled sufficient statistics,
    ROUGE-L and CIDEr as means of resampled per-image scores."""
    n_items = bleu_stats.shape[0]
    out: dict[str, list[np.ndarray]] = {m: [] for m in METRICS}
    for weights in _resample_weights(n_items, n_resamples, seed):
        bleus = corpus_bleu_from_stats(weights @ bleu_stats)
        for k in range(BLEU_N):
            out[f"BLEU-{k + 1}"].append(bleus[:, k])
        for m in ("ROUGE-L", "CIDEr"):
            out[m].append(weights @ per_image[m] / n_items)
    return {m: np.concatenate(v) if v else np.empty(0) for m, v in out.items()}


def _per_image_arrays(per_image: Sequence[Mapping[str, Any]]) -> tuple[list[int], dict[str, np.ndarray], np.ndarray]:
    ids = [int(r["image_id"]) for r in per_image]
    arrays = {m: np.array([float(r[m]) for r in per_image]) for m in ("ROUGE-L", "CIDEr")}
    stats = np.array([r["bleu_stats"] for r in per_image], dtype=np.float64).reshape(len(per_image), -1)
    return ids, arrays, stats


def bootstrap_ci(
    per_image: Sequence[Mapping[str, Any]], n_resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, list[float]]:
    """Percentile bootstrap CIs over images for every metric (``per_image`` as in :func:`score`)."""
    _, arrays, stats = _per_image_arrays(per_image)
    samples = _bootstrap_samples(arrays, stats, n_resamples, seed)
    tail = (1 - level) / 2 * 100
    return {m: [float(v) for v in np.percentile(samples[m], [tail, 100 - tail])] for m in METRICS}


def score(
    references: Mapping[int, Sequence[str]],
    predictions: Mapping[int, str],
    *,
    allow_missing: bool = False,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """Score predictions against references (raw captions; normalised and segmented here).

    Returns a JSON-ready dict: ``BLEU-1``..``BLEU-4``, ``ROUGE-L``, ``CIDEr`` (corpus scores),
    ``n_images`` (scored), ``n_missing`` and ``missing_image_ids`` (reference images without a
    prediction; only with ``allow_missing``), ``n_empty_predictions``, ``n_references_dropped``
    (references empty after segmentation), ``ci`` ``{metric: [lo, hi]}`` (percentile bootstrap
    over images, ``n_resamples`` resamples, seeded; omitted values are None when n_resamples=0),
    ``ci_level``, ``n_resamples``, ``seed``, ``tokenizer`` and ``per_image``: one record per image
    with ``image_id``, ``BLEU-4``, ``ROUGE-L``, ``CIDEr`` and ``bleu_stats`` (BLEU sufficient
    statistics, for corpus-level resampling and :func:`paired_bootstrap`).

    Raises EvaluationError for predictions of unknown images, or reference images without a
    prediction unless ``allow_missing``.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    ids, missing, gts, res, n_refs_dropped = _prepare(references, predictions, allow_missing)
    bleu_corpus, bleu_per_image = Bleu(BLEU_N).compute_score(gts, res, verbose=0)
    rouge_corpus, rouge_per_image = Rouge().compute_score(gts, res)
    cider_corpus, cider_per_image = Cider().compute_score(gts, res)

    bleu_stats = np.array([bleu_sufficient_stats(res[i][0], gts[i]) for i in ids], dtype=np.float64)
    ours = corpus_bleu_from_stats(bleu_stats.sum(axis=0))
    if not np.allclose(ours, bleu_corpus, rtol=1e-9, atol=1e-12):  # guards the bootstrap's BLEU
        raise RuntimeError(f"BLEU sufficient statistics disagree with pycocoevalcap: {ours} vs {bleu_corpus}")

    result: dict[str, Any] = {f"BLEU-{k + 1}": float(bleu_corpus[k]) for k in range(BLEU_N)}
    result["ROUGE-L"] = float(rouge_corpus)
    result["CIDEr"] = float(cider_corpus)
    result["n_images"] = len(ids)
    result["n_missing"] = len(missing)
    result["missing_image_ids"] = missing
    result["n_empty_predictions"] = sum(1 for i in ids if not res[i][0])
    result["n_references_dropped"] = n_refs_dropped

    per_image_scores = {
        "ROUGE-L": np.asarray(rouge_per_image, dtype=np.float64),
        "CIDEr": np.asarray(cider_per_image, dtype=np.float64),
    }
    if n_resamples > 0:
        samples = _bootstrap_samples(per_image_scores, bleu_stats, n_resamples, seed)
        tail = (1 - level) / 2 * 100
        result["ci"] = {m: [float(v) for v in np.percentile(samples[m], [tail, 100 - tail])] for m in METRICS}
    else:
        result["ci"] = {m: [None, None] for m in METRICS}
    result["ci_level"] = level
    result["n_resamples"] = n_resamples
    result["seed"] = seed
    result["tokenizer"] = _tokenizer_description()
    result["per_image"] = [
        {
            "image_id": image_id,
            "BLEU-4": float(bleu_per_image[BLEU_N - 1][j]),
            "ROUGE-L": float(per_image_scores["ROUGE-L"][j]),
            "CIDEr": float(per_image_scores["CIDEr"][j]),
            "bleu_stats": [int(v) for v in bleu_stats[j]],
        }
        for j, image_id in enumerate(ids)
    ]
    return result


def _tokenizer_description() -> str:
    from importlib.metadata import PackageNotFoundError, version

    parts = []
    for pkg in ("fugashi", "unidic-lite", "pycocoevalcap"):
        try:
            parts.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            parts.append(f"{pkg}==?")
    return "normalize_caption + MeCab surface forms without 補助記号 (" + ", ".join(parts) + ")"


# --------------------------------------------------------------------------- paired comparison


def paired_bootstrap(
    result_a: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    result_b: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, dict[str, Any]]:
    """Paired bootstrap comparison of two systems scored on the same images.

    ``result_a``/``result_b`` are :func:`score` results (or their ``per_image`` lists). Both are
    resampled with the same image draws; BLEU is recomputed from resampled sufficient statistics,
    ROUGE-L and CIDEr are means of per-image scores. Returns, per metric: ``a``, ``b``, ``diff``
    (a - b on the full set), ``ci`` (percentile CI of the resampled difference) and ``p_value``
    (two-sided, null-centred: share of resamples with |d* - diff| >= |diff|, with +1 smoothing).
    Raises EvaluationError when the image sets differ.
    """
    per_a = result_a["per_image"] if isinstance(result_a, Mapping) else result_a
    per_b = result_b["per_image"] if isinstance(result_b, Mapping) else result_b
    ids_a, arr_a, stats_a = _per_image_arrays(per_a)
    ids_b, arr_b, stats_b = _per_image_arrays(per_b)
    if set(ids_a) != set(ids_b) or len(ids_a) != len(ids_b):
        only_a, only_b = set(ids_a) - set(ids_b), set(ids_b) - set(ids_a)
        raise EvaluationError(
            "paired comparison needs the same images: "
            + (f"only in A: {_ids_preview(only_a)}; " if only_a else "")
            + (f"only in B: {_ids_preview(only_b)}" if only_b else "duplicate image ids")
        )
    order_b = {image_id: j for j, image_id in enumerate(ids_b)}
    perm = np.array([order_b[i] for i in ids_a], dtype=np.int64)
    arr_b = {m: v[perm] for m, v in arr_b.items()}
    stats_b = stats_b[perm]

    point_a = {**dict(zip(METRICS[:BLEU_N], corpus_bleu_from_stats(stats_a.sum(0)))),
               **{m: arr_a[m].mean() for m in ("ROUGE-L", "CIDEr")}}
    point_b = {**dict(zip(METRICS[:BLEU_N], corpus_bleu_from_stats(stats_b.sum(0)))),
               **{m: arr_b[m].mean() for m in ("ROUGE-L", "CIDEr")}}
    samples_a = _bootstrap_samples(arr_a, stats_a, n_resamples, seed)
    samples_b = _bootstrap_samples(arr_b, stats_b, n_resamples, seed)  # same seed -> same draws
    tail = (1 - level) / 2 * 100
    out: dict[str, dict[str, Any]] = {}
    for m in METRICS:
        diff = float(point_a[m] - point_b[m])
        d = samples_a[m] - samples_b[m]
        extreme = int(np.sum(np.abs(d - diff) >= abs(diff) - 1e-12))
        out[m] = {
            "a": float(point_a[m]),
            "b": float(point_b[m]),
            "diff": diff,
            "ci": [float(v) for v in np.percentile(d, [tail, 100 - tail])],
            "p_value": (extreme + 1) / (n_resamples + 1),
        }
    return out


# --------------------------------------------------------------------------- reporting


def format_table(result: Mapping[str, Any]) -> str:
    """Readable table: metric, score, 95% CI, then image counts."""
    level = result.get("ci_level", 0.95)
    header = f"{'metric':<8}  {'score':>7}  {f'{level:.0%} CI':>18}"
    lines = [header, "-" * len(header)]
    for m in METRICS:
        lo, hi = result.get("ci", {}).get(m, [None, None])
        ci = f"[{lo:.4f}, {hi:.4f}]" if lo is not None else "n/a"
        lines.append(f"{m:<8}  {result[m]:>7.4f}  {ci:>18}")
    lines.append(f"images scored: {result['n_images']}, missing: {result.get('n_missing', 0)}, "
                 f"empty predictions: {result.get('n_empty_predictions', 0)}")
    return "\n".join(lines)


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


PROVENANCE_COLUMNS = (
    "date", "split", "model_id", "revision", "adapter", "params_hash", "split_hash", "git_commit",
)
SCORE_COLUMNS = ("n_images", "n_missing") + tuple(
    c for m in METRICS for c in (m, f"{m}_lo", f"{m}_hi")
)


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
    """Flatten a :func:`score` result plus provenance into one metrics.csv row."""
    row: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
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
    row.setdefault("date", datetime.now(timezone.utc).isoformat(timespec="seconds"))
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
    buf = _stdio.StringIO()
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


# --------------------------------------------------------------------------- a whole run (04_eval)

BASELINE_SYSTEM = "qwen2-vl-2b-instruct"


def prediction_files(run_dir: str | Path) -> list[tuple[str, str, Path]]:
    """(system, split, path) for every ``predictions/<system>__<split>.jsonl`` of a run."""
    out = []
    for path in sorted((Path(run_dir) / "predictions").glob("*__*.jsonl")):
        system, _, split = path.stem.rpartition("__")
        out.append((system, split, path))
    return out


def _split_hashes(processed_dir: Path) -> dict[str, str]:
    """Content hash of each processed split, from the data stage's report.json."""
    report = processed_dir / "report.json"
    if not report.exists():
        return {}
    splits = json.loads(report.read_text(encoding="utf-8")).get("splits") or {}
    return {name: info["hash"] for name, info in splits.items() if isinstance(info, dict) and "hash" in info}


def _system_meta(system: str, path: Path) -> dict[str, Any]:
    """Model id, adapter and registry facts of a prediction file (``<model>`` or ``<model>+adapter``)."""
    from .models import REGISTRY

    model_key, _, tag = system.partition("+")
    meta_path = path.with_suffix(".meta.json")
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.exists() else {}
    entry = REGISTRY.get(model_key)
    return {
        "model_id": meta.get("model_id") or (entry.hub_id if entry and entry.key != "tiny-qwen2-vl" else model_key),
        "revision": meta.get("revision") or "",
        "adapter": meta.get("adapter") or (tag if tag else ""),
        "params_b": entry.params_b if entry else None,
        "trained_on_stair": {True: "yes", False: "no", None: "unknown"}[entry.trained_on_stair] if entry else "unknown",
        "peak_gpu_gib": meta.get("peak_gpu_gib"),
    }


def evaluate_run(params, splits: Sequence[str] | None = None, write_scores: bool = True):
    """Score every prediction file of the run on its split; append one metrics.csv row each.

    Per-image scores go to ``<run>/scores/<system>__<split>.json`` (read by the paired tests and the
    failure-case browser). Returns the run's latest metrics as a DataFrame (one row per system/split).
    """
    splits = list(splits or params.evaluate.splits)
    run_dir = Path(params.run_dir)
    hashes = _split_hashes(Path(params.processed_dir))
    csv_path = run_dir / "metrics.csv"
    scored = 0
    for system, split, path in prediction_files(run_dir):
        if split not in splits:
            continue
        refs_path = Path(params.processed_dir) / f"{split}.jsonl"
        if not refs_path.exists():
            print(f"skip {path.name}: no references at {refs_path}")
            continue
        # zero_shot.max_images caps captioning per split on purpose (quick looks, sweeps): then the
        # covered images are scored and n_missing says how many were left out; otherwise a gap is an error
        capped = params.zero_shot.max_images is not None
        result = score(load_references(refs_path), load_predictions(path), allow_missing=capped,
                       n_resamples=params.evaluate.bootstrap_samples, seed=params.evaluate.seed,
                       level=params.evaluate.confidence)
        meta = _system_meta(system, path)
        if write_scores:
            atomic_write_json(run_dir / "scores" / f"{system}__{split}.json",
                              {"system": system, "split": split, **result}, indent=None)
        row = metrics_row(result, model_id=meta["model_id"], split=split, revision=meta["revision"],
                          adapter=meta["adapter"], params_hash=params.hash(), split_hash=hashes.get(split, ""),
                          system=system, params_b=meta["params_b"], trained_on_stair=meta["trained_on_stair"],
                          peak_gpu_gib=meta["peak_gpu_gib"], run=params.run.name)
        append_metrics_row(csv_path, row)
        scored += 1
    if not scored:
        raise EvaluationError(f"no prediction files for splits {splits} in {run_dir / 'predictions'}: "
                              "run 02_zero_shot (and 03_qlora_train) first")
    df = read_metrics(csv_path, latest_only=True)
    return df[df["split"].isin(splits)].reset_index(drop=True)


def results_table(metrics):
    """The study's table: Model | Params | BLEU-4 | ROUGE-L | CIDEr (with 95% CI) | GPU memory |
    trained on STAIR (a STAIR score of such a model is not zero-shot)."""
    import pandas as pd

    def fmt(row, m, digits):
        lo, hi = row.get(f"{m}_lo"), row.get(f"{m}_hi")
        ci = f" [{lo:.{digits}f}, {hi:.{digits}f}]" if pd.notna(lo) and pd.notna(hi) else ""
        return f"{row[m]:.{digits}f}{ci}"

    rows = []
    for _, r in metrics.iterrows():
        rows.append({
            "Model": r.get("system", r["model_id"]), "Split": r["split"],
            "Params (B)": r.get("params_b", ""), "n": int(r["n_images"]),
            "BLEU-4": fmt(r, "BLEU-4", 3), "ROUGE-L": fmt(r, "ROUGE-L", 3), "CIDEr": fmt(r, "CIDEr", 3),
            "GPU memory (GiB)": r.get("peak_gpu_gib", ""), "trained on STAIR": r.get("trained_on_stair", ""),
        })
    return pd.DataFrame(rows)


def paired_tests(params, metrics, baseline: str | None = None):
    """Paired bootstrap of every system against the zero-shot baseline on the same split.

    The baseline is zero-shot Qwen2-VL-2B where present, else the run's zero-shot model
    (``zero_shot.models[0]``, the tiny model offline)."""
    import pandas as pd

    run_dir = Path(params.run_dir)
    systems = set(metrics["system"]) if "system" in metrics else set()
    if baseline is None:
        baseline = BASELINE_SYSTEM if BASELINE_SYSTEM in systems else params.zero_shot.models[0]
    rows = []
    for split in sorted(set(metrics["split"])):
        base_path = run_dir / "scores" / f"{baseline}__{split}.json"
        if not base_path.exists():
            continue
        base = json.loads(base_path.read_text(encoding="utf-8"))
        for system in sorted(systems - {baseline}):
            path = run_dir / "scores" / f"{system}__{split}.json"
            if not path.exists():
                continue
            other = json.loads(path.read_text(encoding="utf-8"))
            try:
                test = paired_bootstrap(other, base, n_resamples=params.evaluate.bootstrap_samples,
                                        seed=params.evaluate.seed, level=params.evaluate.confidence)
            except EvaluationError as e:
                print(f"skip {system} vs {baseline} on {split}: {e}")
                continue
            for metric in ("BLEU-4", "ROUGE-L", "CIDEr"):
                t = test[metric]
                rows.append({"split": split, "system": system, "baseline": baseline, "metric": metric,
                             "system_score": t["a"], "baseline_score": t["b"], "difference": t["diff"],
                             "ci_low": t["ci"][0], "ci_high": t["ci"][1], "p_value": t["p_value"]})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- CLI


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``jpcap evaluate --pred PRED.jsonl --refs REFS [--out metrics.json] [--allow-missing]``."""
    parser.add_argument("--pred", required=True, type=Path, help="predictions JSONL {image_id, caption}")
    parser.add_argument(
        "--refs", required=True, type=Path, help="references: COCO captions JSON or processed <split>.jsonl"
    )
    parser.add_argument("--out", type=Path, default=None, help="write scores, CIs and per-image scores as JSON")
    parser.add_argument(
        "--allow-missing", action="store_true", help="score only the reference images that have a prediction"
    )
    return parser


def run_evaluate(args: argparse.Namespace) -> int:
    """Run ``jpcap evaluate``; prints the table, writes ``--out``; errors -> stderr, return 2."""
    try:
        references = load_references(args.refs)
        predictions = load_predictions(args.pred)
        try:
            result = score(references, predictions, allow_missing=args.allow_missing)
        except EvaluationError as e:
            raise EvaluationError(f"{args.pred} vs {args.refs}: {e}") from None
        result = {"predictions": str(args.pred), "references": str(args.refs), **result}
        print(format_table(result))
        if result["n_missing"]:
            print(f"note: {result['n_missing']} reference images had no prediction and were not scored: "
                  f"{_ids_preview(result['missing_image_ids'])}", file=sys.stderr)
        if args.out is not None:
            atomic_write_json(args.out, result)
            print(f"wrote {args.out}")
    except (ValueError, OSError) as e:  # EvaluationError, UnicodeDecodeError are ValueErrors
        print(f"jpcap evaluate: error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jpcap evaluate", description=__doc__.splitlines()[0])
    add_evaluate_arguments(parser)
    return run_evaluate(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
