"""Scoring a whole run (notebook 04): every prediction file of the run on its split, a metrics.csv
row each, the study's results table and paired tests against the zero-shot baseline."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from ..io import atomic_write_json
from .bootstrap import paired_bootstrap
from .loaders import EvaluationError, load_predictions, load_references
from .provenance import append_metrics_row, metrics_row, read_metrics
from .scorers import score

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
    from ..models import REGISTRY

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
        meta = _system_meta(system, path)
        # a per-split cap on captioning (zero_shot.max_images for zero-shot files, evaluate.max_images
        # for fine-tuned ones) is on purpose (quick looks, sweeps): the covered images are scored and
        # n_missing says how many were left out; without a cap a gap is an error
        cap = params.evaluate.max_images if meta["adapter"] else params.zero_shot.max_images
        predictions = load_predictions(path)
        result = score(load_references(refs_path), predictions, allow_missing=cap is not None,
                       n_resamples=params.evaluate.bootstrap_samples, seed=params.evaluate.seed,
                       level=params.evaluate.confidence)
        if result["n_duplicate_rows"]:
            print(f"note: {path.name}: {result['n_duplicate_rows']} repeated identical row(s) counted once")
        if write_scores:
            atomic_write_json(run_dir / "scores" / f"{system}__{split}.json",
                              {"system": system, "split": split, **result}, indent=None)
        row = metrics_row(result, model_id=meta["model_id"], split=split, revision=meta["revision"],
                          adapter=meta["adapter"], params_hash=params.fingerprint(),
                          split_hash=hashes.get(split, ""), system=system, params_b=meta["params_b"],
                          trained_on_stair=meta["trained_on_stair"], peak_gpu_gib=meta["peak_gpu_gib"],
                          run=params.run.name)
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
