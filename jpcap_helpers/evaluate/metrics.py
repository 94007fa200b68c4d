"""The reported metrics and BLEU's sufficient statistics, with pycocoevalcap's corpus formula (so
corpus BLEU can be recomputed for bootstrap resamples)."""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np

METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr")
PER_IMAGE_METRICS = ("BLEU-4", "ROUGE-L", "CIDEr")
MEAN_METRICS = ("ROUGE-L", "CIDEr")      # corpus score = mean of the per-image scores
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
