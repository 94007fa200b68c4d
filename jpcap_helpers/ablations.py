"""Ablation sweeps over LoRA rank, LoRA depth and projector freezing (``jpcap sweep``) and their
comparison (``jpcap compare``). Documented in docs/ablations.md.

A sweep is read from the ``ablation`` section of a params file. :func:`expand_sweep` turns it into
one validated override set per run; :func:`sweep` writes one resolved params file per run
(``<base run>/sweep/<run>.yaml``) and executes notebooks 03 and 04 on each with papermill into
``<base run>/sweep/<run>/``, skipping runs already finished with the same params and carrying on past
failures; :func:`compare` collects the runs' metrics, training costs and paired bootstrap tests
against the base setting into tables and figures under ``<base run>/reports/``.
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import re
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import yaml

from .io import atomic_write_json, atomic_write_text
from .params import Params, ParamsError, load_params

__all__ = [
    "AXES", "SWEEP_NOTEBOOKS", "DONE_MARKER", "START_MARKER", "setting_label", "run_name", "base_setting",
    "sweep_root", "reports_dir", "expand_sweep", "describe_sweep", "sweep_run_hash", "sweep",
    "collect_results", "collect_costs", "paired_against_base", "compare",
    "add_sweep_arguments", "run_sweep", "add_compare_arguments", "run_compare",
]

AXES = ("lora_rank", "top_k_layers", "projector")
SWEEP_NOTEBOOKS = ("03_qlora_train", "04_eval")
DONE_MARKER = "DONE.json"          # written after the last notebook of a run succeeded
START_MARKER = "SWEEP_RUN.json"    # written when a run starts: which params the folder holds
SUPERSEDED_DIR = "_superseded"     # run folders of changed params are moved here, never deleted
COMPARE_METRICS = ("BLEU-4", "ROUGE-L", "CIDEr")
_LOCATION_KEYS = ("name", "output_dir", "mount_drive", "drive_dir")


# ---------------------------------------------------------------------------------------------
# expansion
# ---------------------------------------------------------------------------------------------

def setting_label(setting: dict) -> str:
    """``r8-top6-proj_trainable`` for {lora_rank: 8, top_k_layers: 6, projector: trainable}."""
    return f"r{setting['lora_rank']}-top{setting['top_k_layers']}-proj_{setting['projector']}"


def run_name(base_name: str, setting: dict) -> str:
    """Deterministic sweep run name: ``<base run name>-r8-top6-proj_trainable``."""
    return f"{base_name}-{setting_label(setting)}"


def base_setting(params: Params) -> dict:
    """The base params' own values of the three axes (the seed default: r32, top 6, trainable)."""
    return {"lora_rank": params.train.lora_rank, "top_k_layers": params.train.top_k_layers,
            "projector": params.train.projector}


def sweep_root(params: Params) -> Path:
    """``<output_dir>/<base run>/sweep``: the runs' params files and folders."""
    return Path(params.run.output_dir) / params.run.name / "sweep"


def reports_dir(params: Params) -> Path:
    """``<output_dir>/<base run>/reports``: the comparison's tables and figures."""
    return Path(params.run.output_dir) / params.run.name / "reports"


def _where(params: Params) -> str:
    return params.source_file or "params"


def _check_axes(params: Params) -> None:
    """Reject axis values train would refuse, naming the key (``ablation.lora_rank[1]``)."""
    a, where = params.ablation, _where(params)

    def fail(key: str, msg: str):
        raise ParamsError(f"{where}: ablation.{key}: {msg}")

    if a.mode not in ("one_factor", "grid"):
        fail("mode", f"expected 'one_factor' or 'grid', got {a.mode!r}")
    checks = {
        "lora_rank": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
        "top_k_layers": lambda v: v == "all" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1),
        "projector": lambda v: v in ("trainable", "frozen"),
    }
    wanted = {"lora_rank": "an int ≥ 1", "top_k_layers": "an int ≥ 1 or 'all'",
              "projector": "'trainable' or 'frozen'"}
    for axis in AXES:
        values = getattr(a, axis)
        if not isinstance(values, list):
            fail(axis, f"expected a list, got {values!r}")
        seen = []
        for i, v in enumerate(values):
            if not checks[axis](v):
                fail(f"{axis}[{i}]", f"expected {wanted[axis]}, got {v!r}")
            if v in seen:
                fail(f"{axis}[{i}]", f"{v!r} is listed twice")
            seen.append(v)
    for key in ("max_runs", "train_max_steps", "eval_max_images"):
        v = getattr(a, key)
        if v is not None and v < 1:
            fail(key, f"must be ≥ 1 or null, got {v!r}")


def _settings(params: Params) -> list[tuple[dict, Optional[str]]]:
    """Ordered (setting, varied axis) pairs: the base first (varied None), then one axis at a time
    in axis and list order, or the grid in list order; duplicates of the base dropped."""
    base = base_setting(params)
    out: list[tuple[dict, Optional[str]]] = [(base, None)]
    a = params.ablation
    if a.mode == "one_factor":
        for axis in AXES:
            for v in getattr(a, axis):
                s = {**base, axis: v}
                if s != base:
                    out.append((s, axis))
    else:
        lists = [getattr(a, axis) or [base[axis]] for axis in AXES]
        for combo in itertools.product(*lists):
            s = dict(zip(AXES, combo))
            if s != base:
                changed = [ax for ax in AXES if s[ax] != base[ax]]
                out.append((s, "+".join(changed)))
    if a.max_runs is not None:
        out = out[:a.max_runs]
    return out


def _cap(value: Optional[int], cap: Optional[int]) -> Optional[int]:
    if cap is None:
        return value
    return cap if value is None else min(value, cap)


def _overrides(params: Params, setting: dict) -> dict[str, Any]:
    a = params.ablation
    o: dict[str, Any] = {
        "run.name": run_name(params.run.name, setting),
        "run.output_dir": str(sweep_root(params).resolve()),
        "run.mount_drive": False,      # the output folder is decided already (Drive or not)
        "train.lora_rank": setting["lora_rank"],
        "train.top_k_layers": setting["top_k_layers"],
        "train.projector": setting["projector"],
    }
    if a.train_max_steps is not None:
        o["train.max_steps"] = _cap(params.train.max_steps, a.train_max_steps)
    if a.eval_max_images is not None:
        o["zero_shot.max_images"] = _cap(params.zero_shot.max_images, a.eval_max_images)
        o["train.eval_images"] = _cap(params.train.eval_images, a.eval_max_images)
    return o


def _resolved_tree(params: Params) -> dict:
    """The params as a plain tree with every path field absolute (as ``load_params`` leaves them;
    relative ones, from a Params built in code, are taken relative to the working directory)."""
    import dataclasses

    tree = params.to_dict()

    def walk(obj, node: dict) -> None:
        for f in dataclasses.fields(obj):
            if f.metadata.get("internal"):
                continue
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, node[f.name])
            elif f.metadata.get("path") and isinstance(value, str) and not Path(value).is_absolute():
                node[f.name] = str(Path(os.path.expanduser(value)).resolve())

    walk(params, tree)
    return tree


def _apply(tree: dict, overrides: dict[str, Any]) -> dict:
    import copy

    tree = copy.deepcopy(tree)
    for key, value in overrides.items():
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _load_tree(tree: dict, label: str, where: str) -> Params:
    """Validate a params tree with :func:`load_params` (through a temporary file)."""
    with tempfile.TemporaryDirectory(prefix="jpcap-sweep-") as tmp:
        path = Path(tmp) / "run.yaml"
        path.write_text(yaml.safe_dump(tree, allow_unicode=True, sort_keys=False), encoding="utf-8")
        try:
            return load_params(path)
        except ParamsError as e:
            msg = str(e)
            if msg.startswith(f"{path}: "):
                msg = msg[len(f"{path}: "):]
            raise ParamsError(f"{where}: sweep run {label}: {msg}") from None


def expand_sweep(params: Params) -> list[dict[str, Any]]:
    """One override dict per sweep run, base setting first, each validated by ``load_params`` on the
    resolved base params before anything runs. Keys: ``run.name``, ``run.output_dir``,
    ``run.mount_drive``, ``train.lora_rank``, ``train.top_k_layers``, ``train.projector`` and, when the
    ablation section caps them, ``train.max_steps``, ``zero_shot.max_images``, ``train.eval_images``.
    Raises ParamsError naming the key for an invalid axis value."""
    _check_axes(params)
    tree = _resolved_tree(params)
    runs = []
    for setting, _ in _settings(params):
        o = _overrides(params, setting)
        _load_tree(_apply(tree, o), o["run.name"], _where(params))
        runs.append(o)
    return runs


def _run_params(params: Params, overrides: dict[str, Any]) -> Params:
    rp = _load_tree(_apply(_resolved_tree(params), overrides), overrides["run.name"], _where(params))
    rp.source_file = str(sweep_root(params).resolve() / f"{rp.run.name}.yaml")
    return rp


def sweep_run_hash(params: Params) -> str:
    """Hash of what changes a sweep run's results: every section but ``ablation`` and the run's
    location keys (so adding a value to an axis does not re-run the finished runs)."""
    d = params.to_dict()
    d.pop("ablation", None)
    d["run"] = {k: v for k, v in d["run"].items() if k not in _LOCATION_KEYS}
    return hashlib.sha256(json.dumps(d, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:12]


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _status(run_dir: Path, run_hash: str) -> str:
    done = _read_json(run_dir / DONE_MARKER)
    if done and done.get("params_hash") == run_hash:
        return "done"
    start = _read_json(run_dir / START_MARKER)
    if start and start.get("params_hash") == run_hash:
        return "failed" if start.get("failure") else "started"
    if done or start:
        return "stale"      # finished or started with other params: re-runs from scratch
    return "pending"


def describe_sweep(params: Params):
    """The sweep as a table: run, setting, what is varied, caps, status on disk, run folder."""
    import pandas as pd

    _check_axes(params)
    rows = []
    for i, (setting, varied) in enumerate(_settings(params)):
        o = _overrides(params, setting)
        rp = _run_params(params, o)
        rows.append({"run": o["run.name"], "base": i == 0, "varied": varied or "(base)", **setting,
                     "max_steps": rp.train.max_steps, "max_images": rp.zero_shot.max_images,
                     "status": _status(rp.run_dir, sweep_run_hash(rp)), "run_dir": str(rp.run_dir)})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------

def _write_run_file(path: Path, rp: Params, run_hash: str, base: Params) -> Path:
    header = (f"# sweep run {rp.run.name} of {base.source_file}\n"
              f"# sweep run hash: {run_hash} · params hash: {rp.hash()}\n")
    body = yaml.safe_dump(rp.to_dict(), allow_unicode=True, sort_keys=False)
    return atomic_write_text(path, header + body)


def _failure(run: str, notebook: str, exc: BaseException, executed: Optional[Path]) -> dict:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    m = re.search(r"failed in cell (\d+)", first)
    err = re.search(r"\):\s*(.*)$", first)
    return {"run": run, "notebook": notebook, "cell": int(m.group(1)) if m else None,
            "error": (err.group(1) if (m and err) else f"{type(exc).__name__}: {first}")[:500],
            "executed": str(executed) if executed else ""}


def _preflight(params: Params) -> None:
    needed = [Path(params.processed_dir) / "train_pairs.jsonl"]
    needed += [Path(params.processed_dir) / f"{s}.jsonl" for s in params.evaluate.splits]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise FileNotFoundError(f"sweep needs the processed data first (run 01_data): missing {', '.join(missing)}")


def sweep(params: Params, *, runner: Optional[Callable[..., Any]] = None,
          notebooks: Sequence[str] = SWEEP_NOTEBOOKS, echo: Callable[[str], Any] = print,
          log_output: bool = False, progress_bar: bool = False, force: bool = False,
          check_data: bool = True) -> dict[str, Any]:
    """Run every sweep run's notebooks (03 then 04) with papermill, in order.

    Writes ``<sweep root>/<run>.yaml`` (resolved params) and ``sweep.json`` (the plan); executed
    notebooks go into ``<sweep root>/<run>/``. A run whose ``DONE.json`` holds the same
    :func:`sweep_run_hash` is skipped (``force`` runs it again: training and captioning resume and
    are no-ops when finished, 04 scores again). A run folder holding other params is moved to
    ``<sweep root>/_superseded/<run>-<old hash>/`` first. A failing notebook ends that run only; the
    sweep goes on and every failure is listed at the end.

    ``runner`` (tests) replaces :func:`jpcap_helpers.runner.run_notebook` with the same signature.
    Returns ``{"root", "runs": [{run, status, seconds, run_dir, params_file}], "failures": [{run,
    notebook, cell, error, executed}], "seconds"}``; status is done (now), skipped or failed.
    """
    if runner is None:
        from .runner import run_notebook as runner
    runs = expand_sweep(params)                       # validates every run before anything runs
    if check_data:
        _preflight(params)
    root = sweep_root(params)
    root.mkdir(parents=True, exist_ok=True)
    plans = []
    for o in runs:
        rp = _run_params(params, o)
        h = sweep_run_hash(rp)
        path = _write_run_file(root / f"{rp.run.name}.yaml", rp, h, params)
        plans.append((rp, h, path))
    atomic_write_json(root / "sweep.json", {
        "base_params": params.source_file, "base_run": params.run.name, "mode": params.ablation.mode,
        "notebooks": list(notebooks), "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "runs": [{"run": rp.run.name, "base": i == 0, "setting": base_setting(rp), "params_hash": h,
                  "params_file": str(path), "run_dir": str(rp.run_dir)} for i, (rp, h, path) in enumerate(plans)],
    })
    echo(f"sweep: {len(plans)} run(s) of {params.run.name} ({params.ablation.mode}) → {root}")
    results, failures = [], []
    start_all = time.time()
    for i, (rp, h, path) in enumerate(plans, start=1):
        name, run_dir = rp.run.name, Path(rp.run_dir)
        status = _status(run_dir, h)
        if status == "done" and not force:
            echo(f"[{i}/{len(plans)}] {name}: finished before with the same params, skipped")
            results.append({"run": name, "status": "skipped", "seconds": 0.0, "run_dir": str(run_dir),
                            "params_file": str(path)})
            continue
        if status == "stale":
            old = (_read_json(run_dir / START_MARKER) or _read_json(run_dir / DONE_MARKER) or {}).get("params_hash", "old")
            dest = root / SUPERSEDED_DIR / f"{name}-{old}"
            if dest.exists():
                dest = dest.with_name(f"{dest.name}-{int(time.time())}")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(run_dir), str(dest))
            echo(f"[{i}/{len(plans)}] {name}: its folder held other params; moved to {dest}")
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / DONE_MARKER).unlink(missing_ok=True)
        atomic_write_json(run_dir / START_MARKER, {"run": name, "params_hash": h, "params_file": str(path),
                                                  "started": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        t0 = time.time()
        failure = None
        for nb in notebooks:
            echo(f"[{i}/{len(plans)}] {name}: ▶ {nb}")
            try:
                runner(nb, path, name, run_dir, {}, log_output=log_output, progress_bar=progress_bar)
            except Exception as exc:  # NotebookFailed, a dead kernel, a missing notebook: record, go on
                failure = _failure(name, nb, exc, run_dir / f"{nb}.ipynb")
                echo(f"[{i}/{len(plans)}] {name}: ✘ {nb} failed: {failure['error']}")
                break
        seconds = time.time() - t0
        if failure:
            failures.append(failure)
            atomic_write_json(run_dir / START_MARKER, {**(_read_json(run_dir / START_MARKER) or {}), "failure": failure})
            results.append({"run": name, "status": "failed", "seconds": seconds, "run_dir": str(run_dir),
                            "params_file": str(path)})
            continue
        atomic_write_json(run_dir / DONE_MARKER, {
            "run": name, "params_hash": h, "params_file": str(path), "notebooks": list(notebooks),
            "seconds": round(seconds, 1), "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        echo(f"[{i}/{len(plans)}] {name}: ✔ in {seconds:.0f}s")
        results.append({"run": name, "status": "done", "seconds": seconds, "run_dir": str(run_dir),
                        "params_file": str(path)})
    total = time.time() - start_all
    counts = {s: sum(r["status"] == s for r in results) for s in ("done", "skipped", "failed")}
    echo(f"sweep: {counts['done']} run, {counts['skipped']} skipped, {counts['failed']} failed in {total:.0f}s")
    for f in failures:
        cell = f"cell {f['cell']}" if f["cell"] is not None else "no cell"
        echo(f"  ✘ {f['run']} · {f['notebook']} · {cell}: {f['error']}  ({f['executed']})")
    return {"root": str(root), "runs": results, "failures": failures, "seconds": total}


# ---------------------------------------------------------------------------------------------
# comparison
# ---------------------------------------------------------------------------------------------

def _sweep_runs(params: Params) -> list[tuple[Params, dict, bool]]:
    _check_axes(params)
    out = []
    for i, (setting, _) in enumerate(_settings(params)):
        out.append((_run_params(params, _overrides(params, setting)), setting, i == 0))
    return out


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
    for rp, setting, is_base in _sweep_runs(params):
        run_dir = Path(rp.run_dir)
        result = _read_json(run_dir / "train_result.json") or {}
        plan = _read_json(run_dir / "train_plan.json") or {}
        rows.append({
            "run": rp.run.name, "label": setting_label(setting), "base": is_base, **setting,
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

    from .evaluate import read_metrics

    costs = collect_costs(params).set_index("run")
    frames, missing = [], []
    for rp, setting, is_base in _sweep_runs(params):
        csv_path = Path(rp.run_dir) / "metrics.csv"
        status = _status(Path(rp.run_dir), sweep_run_hash(rp))
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
        df.insert(1, "label", setting_label(setting))
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

    from .evaluate import EvaluationError, paired_bootstrap

    if table is None:
        table, _ = collect_results(params)
    columns = ["split", "run", "label", "baseline", "metric", "run_score", "baseline_score", "difference",
               "ci_low", "ci_high", "p_value", "n_images", "note"]
    if table is None or not len(table) or not table["base"].any():
        return pd.DataFrame(columns=columns)
    runs = {rp.run.name: rp for rp, _, _ in _sweep_runs(params)}
    rows = []
    e = params.evaluate
    for split, sub in table.groupby("split", sort=False):
        base_rows = sub[sub["base"]]
        if not len(base_rows):
            continue
        b = base_rows.iloc[0]
        base_path = Path(runs[b["run"]].run_dir) / "scores" / f"{b['system']}__{split}.json"
        base_scores = _read_json(base_path)
        for _, r in sub[~sub["base"]].iterrows():
            path = Path(runs[r["run"]].run_dir) / "scores" / f"{r['system']}__{split}.json"
            other = _read_json(path)
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
                                     f"Paired bootstrap of each sweep run against the base setting")
    if figures and len(table):
        from . import reports

        base = base_setting(params)
        figs = {
            "ablation_metrics_by_axis": reports.ablation_axis_figure(table, COMPARE_METRICS, AXES, base),
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


# ---------------------------------------------------------------------------------------------
# CLI: jpcap sweep / jpcap compare
# ---------------------------------------------------------------------------------------------

def _common_arguments(parser) -> None:
    parser.add_argument("--params", required=True, help="params YAML with an ablation section")
    parser.add_argument("--run-name", default=None, help="base run name (default: run.name)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a base param, e.g. --set ablation.max_runs=2 (YAML value)")


def add_sweep_arguments(parser) -> None:
    """``jpcap sweep --params FILE [--run-name NAME] [--set k=v] [--dry-run] [--force] [--log-output]``."""
    _common_arguments(parser)
    parser.add_argument("--dry-run", action="store_true", help="validate and list the runs; run nothing")
    parser.add_argument("--force", action="store_true", help="run finished runs again (they resume)")
    parser.add_argument("--log-output", action="store_true", help="stream the notebooks' cell outputs")


def add_compare_arguments(parser) -> None:
    """``jpcap compare --params FILE [--run-name NAME] [--set k=v] [--no-figures]``."""
    _common_arguments(parser)
    parser.add_argument("--no-figures", action="store_true", help="tables only")


def _load(params_file, run_name_: Optional[str], overrides) -> Params:
    from .runner import parse_overrides

    over = parse_overrides(overrides) if overrides and not isinstance(overrides, dict) else dict(overrides or {})
    if run_name_:
        over["run.name"] = run_name_
    return load_params(params_file, over)


def _args(args_or_file, kwargs: dict, defaults: dict) -> argparse.Namespace:
    if isinstance(args_or_file, argparse.Namespace):
        return args_or_file
    ns = argparse.Namespace(params=str(args_or_file), run_name=None, overrides=[], **defaults)
    for k, v in kwargs.items():
        setattr(ns, k, v)
    return ns


def run_sweep(args, **kwargs) -> int:
    """``jpcap sweep``: ``args`` from :func:`add_sweep_arguments`, or a params file plus keyword
    arguments (run_name, overrides, dry_run, force, log_output, runner). 0 = every run finished,
    1 = some run failed, 2 = bad params or missing data."""
    runner = kwargs.pop("runner", None)
    args = _args(args, kwargs, {"dry_run": False, "force": False, "log_output": False})
    try:
        params = _load(args.params, args.run_name, args.overrides)
        if args.dry_run:
            print(describe_sweep(params).to_string(index=False))
            return 0
        result = sweep(params, runner=runner, force=args.force, log_output=args.log_output, progress_bar=True)
    except (ParamsError, ValueError, FileNotFoundError) as e:
        print(f"jpcap sweep: {e}", file=sys.stderr)
        return 2
    return 1 if result["failures"] else 0


def run_compare(args, **kwargs) -> int:
    """``jpcap compare``: writes the tables and figures, prints the results table; 2 on bad params,
    1 when no run has results yet."""
    args = _args(args, kwargs, {"no_figures": False})
    try:
        params = _load(args.params, args.run_name, args.overrides)
        out = compare(params, figures=not args.no_figures)
    except (ParamsError, ValueError, FileNotFoundError) as e:
        print(f"jpcap compare: {e}", file=sys.stderr)
        return 2
    if not len(out["table"]):
        print(f"jpcap compare: no sweep run of {params.run.name} has results yet (jpcap sweep first)",
              file=sys.stderr)
        return 1
    cols = [c for c in ("label", "split", "n_images", "BLEU-4", "ROUGE-L", "CIDEr", "trainable_params",
                        "peak_memory_gib", "train_seconds") if c in out["table"]]
    print(out["table"][cols].to_string(index=False))
    for path in out["files"]:
        print(f"wrote {path}")
    return 0
