"""Evaluation of Japanese captions (docs/evaluation.md): loading references and predictions,
BLEU-1..4 / ROUGE-L / CIDEr-D on MeCab segmentation, bootstrap CIs and paired tests, metrics.csv
provenance, scoring a whole run and several runs side by side (notebook 04)."""
from .bootstrap import bootstrap_ci, bootstrap_samples, paired_bootstrap, per_image_arrays, resample_weights
from .compare import compare_runs, sibling_runs
from .loaders import EvaluationError, Predictions, ids_preview, load_predictions, load_references, read_json_lines
from .metrics import (
    BLEU_N,
    BLEU_STATS_COLUMNS,
    METRICS,
    PER_IMAGE_METRICS,
    bleu_sufficient_stats,
    corpus_bleu_from_stats,
)
from .provenance import PROVENANCE_COLUMNS, SCORE_COLUMNS, append_metrics_row, git_commit, metrics_row, read_metrics
from .runs import BASELINE_SYSTEM, evaluate_run, paired_tests, prediction_files, results_table
from .scorers import format_table, score, tokenize_for_eval, tokenizer_description

__all__ = [
    "METRICS", "PER_IMAGE_METRICS", "BLEU_N", "BLEU_STATS_COLUMNS", "EvaluationError", "Predictions",
    "ids_preview", "read_json_lines", "load_references", "load_predictions", "tokenize_for_eval",
    "bleu_sufficient_stats", "corpus_bleu_from_stats", "score", "tokenizer_description", "format_table",
    "resample_weights", "bootstrap_samples", "per_image_arrays", "bootstrap_ci", "paired_bootstrap",
    "PROVENANCE_COLUMNS", "SCORE_COLUMNS", "git_commit", "metrics_row", "append_metrics_row", "read_metrics",
    "BASELINE_SYSTEM", "prediction_files", "evaluate_run", "results_table", "paired_tests", "compare_runs", "sibling_runs",
]
