"""Ablation study of the fine-tuning recipe (docs/ablations.md): the sweep (expansion and resumable
runner, :mod:`.sweeps`, re-exported here) and the comparison of its finished runs — results and cost
tables, paired bootstrap tests against the base setting, figures under ``<base run>/reports/``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ..evaluate import EvaluationError, paired_bootstrap, read_metrics
from ..io import atomic_write_text
from ..params import Params
from .sweeps import (
    AXES,
    DONE_MARKER,
    FINGERPRINT_EXCLUDE,
    START_MARKER,
    SUPERSEDED_DIR,
    SWEEP_NOTEBOOKS,
    base_setting,
    describe_sweep,
    expand_sweep,
    model_slug,
    read_json,
    reports_dir,
    run_fingerprint,
    run_name,
    run_status,
    setting_label,
    sweep,
    sweep_root,
    sweep_runs,
    swept_axes,
)

__all__ = [
    "AXES", "SWEEP_NOTEBOOKS", "DONE_MARKER", "START_MARKER", "SUPERSEDED_DIR", "FINGERPRINT_EXCLUDE",
    "COMPARE_METRICS", "SUMMARY_COLUMNS", "setting_label", "run_name", "base_setting", "model_slug",
    "sweep_root", "reports_dir", "expand_sweep", "sweep_runs", "swept_axes", "run_fingerprint", "run_status", "describe_sweep", "sweep",
    "collect_results", "collect_costs", "paired_against_base", "compare", "summary_table",
]

COMPARE_METRICS = ("BLEU-4", "ROUGE-L", "CIDEr")
# the columns of the short results table (``jpcap compare`` prints it; notebook 05 adds the CIs)
SUMMARY_COLUMNS = ("label", "split", "n_images", "BLEU-4", "ROUGE-L", "CIDEr", "trainable_params",
                   "peak_memory_gib", "train_seconds")


def _finetuned_rows(df):
    """The fine-tuned systems' rows (``<model>+<tag>`` or a non-empty adapter); all rows if none."""
    mask = df["system"].astype(str).str.contains(r"\+", regex=True) if "system" in df else None
    if "adapter" in df:
        adapter = df["adapter"].astype(str).str.len() > 0
        mask = adapter if mask is None else (mask | adapter)
    if mask is None or not mask.any():
        return df
    return df[mask]


def collect_costs(params: Params):
    """Per sweep run: trainable params, peak memory (GiB and what was measured), training seconds and
    steps, final losses — from ``train_result.json``, else ``train_plan.json`` (what train writes)."""
    import pandas as pd

    rows = []
    for rp, setting, is_base in sweep_runs(params):
        run_dir = Path(rp.run_dir)
        result = read_json(run_dir / "train_result.json") or {}
        plan = read_json(run_dir / "train_plan.json") or {}
        rows.append({
            "run": rp.run.name, "label": setting_label(setting, params.model.name), "base": is_base, **setting,
            "trainable_params": result.get("trainable_params", plan.get("trainable_params")),
            "total_params": plan.get("total_params"),
            "peak_memory_gib": result.get("peak_memory_gib", plan.get("peak_memory_gib")),
            "peak_memory_kind": result.get("peak_memory_kind", plan.get("peak_memory_kind", "")),
            "train_seconds": result.get("seconds"), "steps": result.get("steps"),
            "final_train_loss": result.get("final_train_loss"), "final_val_cider": result.get("final_val_cider"),
            "cost_source": "train_result.json" if result else ("train_plan.json" if plan else ""),
        })
    return pd.DataFrame(rows)


def collect_results(params: Params):
    """(results table, missing runs): the latest metrics.csv rows of every sweep run's fine-tuned
    system, one row per (run, split), with the run's setting and cost columns."""
    import pandas as pd

    costs = collect_costs(params).set_index("run")
    frames, missing = [], []
    for rp, setting, is_base in sweep_runs(params):
        csv_path = Path(rp.run_dir) / "metrics.csv"
        status = run_status(Path(rp.run_dir), run_fingerprint(rp))
        if not csv_path.exists():
            missing.append({"run": rp.run.name, "status": status, "reason": f"no {csv_path}"})
            continue
        df = _finetuned_rows(read_metrics(csv_path, latest_only=True))
        df = df[df["split"].isin(rp.evaluate.splits)] if len(df) else df
        if not len(df):
            missing.append({"run": rp.run.name, "status": status, "reason": "no scored split in metrics.csv"})
            continue
        df = df.drop(columns=[c for c in ("run", "label", "base", *AXES, "status") if c in df.columns])
        df.insert(0, "run", rp.run.name)
        df.insert(1, "label", setting_label(setting, params.model.name))
        df.insert(2, "base", is_base)
        for j, axis in enumerate(AXES):
            df.insert(3 + j, axis, [setting[axis]] * len(df))
        df["status"] = status
        frames.append(df)
    if not frames:
        return pd.DataFrame(), pd.DataFrame(missing, columns=["run", "status", "reason"])
    table = pd.concat(frames, ignore_index=True)
    cost_cols = ["trainable_params", "peak_memory_gib", "peak_memory_kind", "train_seconds", "steps",
                 "final_train_loss"]
    for c in cost_cols:
        table[c] = table["run"].map(costs[c])
    keep = (["run", "label", "base", *AXES, "split", "system", "n_images"]
            + [c for m in COMPARE_METRICS for c in (m, f"{m}_lo", f"{m}_hi")]
            + cost_cols + ["status", "params_hash"])
    table = table[[c for c in keep if c in table.columns]]
    return table, pd.DataFrame(missing, columns=["run", "status", "reason"])


def paired_against_base(params: Params, table=None):
    """Paired bootstrap (``evaluate.paired_bootstrap``, the base params' evaluate settings) of every
    run's per-image scores against the base setting's on the same split, per metric."""
    import pandas as pd

    if table is None:
        table, _ = collect_results(params)
    columns = ["split", "run", "label", "baseline", "metric", "run_score", "baseline_score", "difference",
               "ci_low", "ci_high", "p_value", "n_images", "note"]
    if table is None or not len(table) or not table["base"].any():
        return pd.DataFrame(columns=columns)
    runs = {rp.run.name: rp for rp, _, _ in sweep_runs(params)}
    rows = []
    e = params.evaluate
    for split, sub in table.groupby("split", sort=False):
        base_rows = sub[sub["base"]]
        if not len(base_rows):
            continue
        b = base_rows.iloc[0]
        base_path = Path(runs[b["run"]].run_dir) / "scores" / f"{b['system']}__{split}.json"
        base_scores = read_json(base_path)
        for _, r in sub[~sub["base"]].iterrows():
            path = Path(runs[r["run"]].run_dir) / "scores" / f"{r['system']}__{split}.json"
            other = read_json(path)
            common = {"split": split, "run": r["run"], "label": r["label"], "baseline": b["run"]}
            if base_scores is None or other is None:
                rows.append({**common, "note": f"no per-image scores at {path if other is None else base_path}"})
                continue
            try:
                test = paired_bootstrap(other, base_scores, n_resamples=e.bootstrap_samples, seed=e.seed,
                                        level=e.confidence)
            except EvaluationError as exc:
                rows.append({**common, "note": str(exc)[:300]})
                continue
            for m in COMPARE_METRICS:
                t = test[m]
                rows.append({**common, "metric": m, "run_score": t["a"], "baseline_score": t["b"],
                             "difference": t["diff"], "ci_low": t["ci"][0], "ci_high": t["ci"][1],
                             "p_value": t["p_value"], "n_images": len(other.get("per_image", [])), "note": ""})
    return pd.DataFrame(rows, columns=columns)


def _write_table(df, stem: Path, title: str) -> list[Path]:
    from .reports import markdown_table

    csv_path = atomic_write_text(stem.with_suffix(".csv"), df.to_csv(index=False))
    md_path = atomic_write_text(stem.with_suffix(".md"), f"# {title}\n\n" + markdown_table(df))
    return [csv_path, md_path]


def compare(params: Params, *, write: bool = True, figures: bool = True, echo: Callable[[str], Any] = print) -> dict:
    """Collect every sweep run of ``params`` (the seed's compare_runs): results table, cost table,
    paired tests against the base setting, and figures.

    Writes under ``<base run>/reports/``: ``ablation_results.{csv,md}``, ``ablation_costs.{csv,md}``,
    ``ablation_paired.{csv,md}`` and PNGs ``ablation_metrics_by_axis.png``, ``ablation_runs_CIDEr.png``,
    ``ablation_cost.png``, ``ablation_paired.png``. Returns ``{"table", "costs", "paired", "missing",
    "figures": {name: Figure}, "files": [paths]}``; runs without metrics are listed in ``missing``.
    """
    table, missing = collect_results(params)
    costs = collect_costs(params)
    paired = paired_against_base(params, table)
    out: dict[str, Any] = {"table": table, "costs": costs, "paired": paired, "missing": missing,
                           "figures": {}, "files": []}
    rdir = reports_dir(params)
    if write:
        out["files"] += _write_table(table, rdir / "ablation_results", f"Ablations of {params.run.name}")
        out["files"] += _write_table(costs, rdir / "ablation_costs", f"Training cost of {params.run.name}'s sweep runs")
        out["files"] += _write_table(paired, rdir / "ablation_paired",
                                     "Paired bootstrap of each sweep run against the base setting")
    if figures and len(table):
        from . import reports

        base = base_setting(params)
        figs = {
            "ablation_metrics_by_axis": reports.ablation_axis_figure(table, COMPARE_METRICS, swept_axes(params), base),
            "ablation_runs_CIDEr": reports.bar_chart_with_ci(table, x="label", y="CIDEr", lo="CIDEr_lo",
                                                             hi="CIDEr_hi", hue="split",
                                                             title="CIDEr of each sweep run (95% CI)"),
        }
        if costs[["trainable_params", "peak_memory_gib", "train_seconds"]].notna().any().any():
            figs["ablation_cost"] = reports.ablation_cost_figure(costs)
        if len(paired) and paired["difference"].notna().any():
            figs["ablation_paired"] = reports.paired_difference_figure(paired, COMPARE_METRICS)
        out["figures"] = figs
        for name, fig in figs.items():
            if write:
                out["files"].append(reports.save_figure(fig, rdir / f"{name}.png"))
            reports.plt.close(fig)   # shown where the notebook displays it, not all at once here
    for m in missing.itertuples():
        echo(f"compare: {m.run} has no results yet ({m.status}: {m.reason})")
    return out


def summary_table(table, ci: bool = False):
    """The short view of ``compare()["table"]``: :data:`SUMMARY_COLUMNS` (with ``ci`` also CIDEr's
    95% CI bounds) that the table has."""
    cols = list(SUMMARY_COLUMNS)
    if ci:
        cols[cols.index("CIDEr") + 1:cols.index("CIDEr") + 1] = ["CIDEr_lo", "CIDEr_hi"]
    return table[[c for c in cols if c in table.columns]]
