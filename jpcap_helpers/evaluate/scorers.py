"""Japanese caption scoring: BLEU-1..4, ROUGE-L, CIDEr-D with bootstrap CIs.

Pipeline (docs/evaluation.md): references and predictions go through
:func:`jpcap_helpers.text.normalize_caption`, are segmented with MeCab/unidic-lite
(:func:`jpcap_helpers.text.segment`, which drops 補助記号 and whitespace), joined with single
spaces, and scored by pycocoevalcap's ``Bleu(4)``, ``Rouge()`` and ``Cider()`` directly
(pycocoevalcap's PTBTokenizer cannot segment Japanese; METEOR and SPICE are English-only).

Scales: BLEU and ROUGE-L in [0, 1]; CIDEr as pycocoevalcap reports it (not x100).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from ..text import normalize_caption, segment
from .bootstrap import bootstrap_samples, percentile_ci
from .loaders import EvaluationError, ids_preview
from .metrics import BLEU_N, METRICS, bleu_sufficient_stats, corpus_bleu_from_stats


def tokenize_for_eval(text: str) -> str:
    """Normalise, segment (MeCab surface forms without 補助記号) and join with single spaces."""
    return " ".join(segment(normalize_caption(text)))


def _prepare(
    references: Mapping[int, Sequence[str]], predictions: Mapping[int, str], allow_missing: bool
) -> tuple[list[int], list[int], dict[int, list[str]], dict[int, list[str]], int]:
    unknown = set(predictions) - set(references)
    if unknown:
        raise EvaluationError(f"predictions for image ids not in the references: {ids_preview(unknown)}")
    missing = sorted(set(references) - set(predictions))
    if missing and not allow_missing:
        raise EvaluationError(
            f"{len(missing)} reference images have no prediction: {ids_preview(missing)} "
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
    (references empty after segmentation), ``n_duplicate_rows`` (repeated identical prediction
    rows, when ``predictions`` comes from ``load_predictions``; else 0), ``ci`` ``{metric: [lo, hi]}``
    (percentile bootstrap over images, ``n_resamples`` resamples, seeded; None when n_resamples=0),
    ``ci_level``, ``n_resamples``, ``seed``, ``tokenizer`` and ``per_image``: one record per image
    with ``image_id``, ``BLEU-4``, ``ROUGE-L``, ``CIDEr`` and ``bleu_stats`` (BLEU sufficient
    statistics, for corpus-level resampling and ``paired_bootstrap``).

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
    result["n_duplicate_rows"] = int(getattr(predictions, "n_duplicate_rows", 0))

    per_image_scores = {
        "ROUGE-L": np.asarray(rouge_per_image, dtype=np.float64),
        "CIDEr": np.asarray(cider_per_image, dtype=np.float64),
    }
    if n_resamples > 0:
        result["ci"] = percentile_ci(bootstrap_samples(per_image_scores, bleu_stats, n_resamples, seed), level)
    else:
        result["ci"] = {m: [None, None] for m in METRICS}
    result["ci_level"] = level
    result["n_resamples"] = n_resamples
    result["seed"] = seed
    result["tokenizer"] = tokenizer_description()
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


def tokenizer_description() -> str:
    """The evaluation tokenisation and the versions of the packages behind it."""
    from importlib.metadata import PackageNotFoundError, version

    parts = []
    for pkg in ("fugashi", "unidic-lite", "pycocoevalcap"):
        try:
            parts.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            parts.append(f"{pkg}==?")
    return "normalize_caption + MeCab surface forms without 補助記号 (" + ", ".join(parts) + ")"


def format_table(result: Mapping[str, Any]) -> str:
    """Readable table: metric, score, CI, then image counts."""
    level = result.get("ci_level", 0.95)
    header = f"{'metric':<8}  {'score':>7}  {f'{level:.0%} CI':>18}"
    lines = [header, "-" * len(header)]
    for m in METRICS:
        lo, hi = result.get("ci", {}).get(m, [None, None])
        ci = f"[{lo:.4f}, {hi:.4f}]" if lo is not None else "n/a"
        lines.append(f"{m:<8}  {result[m]:>7.4f}  {ci:>18}")
    lines.append(f"images scored: {result['n_images']}, missing: {result.get('n_missing', 0)}, "
                 f"empty predictions: {result.get('n_empty_predictions', 0)}, "
                 f"duplicate prediction rows: {result.get('n_duplicate_rows', 0)}")
    return "\n".join(lines)
