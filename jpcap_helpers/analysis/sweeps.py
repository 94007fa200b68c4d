"""Ablation sweeps over LoRA rank, LoRA depth and projector freezing (docs/ablations.md): expansion
of the params' ``ablation`` section into runs, and the resumable papermill runner.

:func:`expand_sweep` turns the section into one override set per run, each validated by
``Params.with_overrides``; :func:`sweep` writes each run's resolved params into its folder
``<base run>/sweep/<run>/`` and executes notebooks 03 and 04 there, skipping runs already finished
with the same params fingerprint and carrying on past failures.
"""
from __future__ import annotations

import itertools
import json
import re
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from ..io import atomic_write_json, run_lock
from ..params import Params, ParamsError, save_resolved

AXES = ("lora_rank", "top_k_layers", "projector")
SWEEP_NOTEBOOKS = ("03_qlora_train", "04_eval")
DONE_MARKER = "DONE.json"          # written after the last notebook of a run succeeded
START_MARKER = "SWEEP_RUN.json"    # written when a run starts: which params the folder holds
SUPERSEDED_DIR = "_superseded"     # run folders of changed params are moved here, never deleted
# a run's fingerprint ignores the ablation section (and, always, the run's name and location), so
# adding a value to an axis does not re-run the finished runs
FINGERPRINT_EXCLUDE = ("ablation",)


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
    """``<base run>/sweep``: the sweep plan and the runs' folders."""
    return Path(params.run_dir) / "sweep"


def reports_dir(params: Params) -> Path:
    """``<base run>/reports``: the comparison's tables and figures."""
    return Path(params.run_dir) / "reports"


def _where(params: Params) -> str:
    return params.source_file or "params"


def _check_axes(params: Params) -> None:
    """Reject a value listed twice on an axis, naming the key (``ablation.lora_rank[1]``); the values'
    types and ranges are checked by the params schema."""
    for axis in AXES:
        seen = []
        for i, v in enumerate(getattr(params.ablation, axis)):
            if v in seen:
                raise ParamsError(f"{_where(params)}: ablation.{axis}[{i}]: {v!r} is listed twice")
            seen.append(v)


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
        o["evaluate.max_images"] = _cap(params.evaluate.max_images, a.eval_max_images)
        o["train.eval_images"] = _cap(params.train.eval_images, a.eval_max_images)
    return o


def _run_params(params: Params, overrides: dict[str, Any]) -> Params:
    """The run's params, built in memory; a refusal names the sweep run and the key."""
    try:
        return params.with_overrides(overrides)
    except ParamsError as e:
        msg, prefix = str(e), f"{params.source_file or '<params>'}: "
        msg = msg[len(prefix):] if msg.startswith(prefix) else msg
        raise ParamsError(f"{_where(params)}: sweep run {overrides['run.name']}: {msg}") from None


def expand_sweep(params: Params) -> list[dict[str, Any]]:
    """One override dict per sweep run, base setting first, each validated (``Params.with_overrides``)
    before anything runs. Keys: ``run.name``, ``run.output_dir``, ``run.mount_drive``,
    ``train.lora_rank``, ``train.top_k_layers``, ``train.projector`` and, when the ablation section caps
    them, ``train.max_steps``, ``zero_shot.max_images``, ``evaluate.max_images``, ``train.eval_images``.
    Raises ParamsError naming the key for a value listed twice or a run the schema refuses."""
    _check_axes(params)
    runs = []
    for setting, _ in _settings(params):
        o = _overrides(params, setting)
        _run_params(params, o)
        runs.append(o)
    return runs


def sweep_runs(params: Params) -> list[tuple[Params, dict, bool]]:
    """(run params, setting, is base) of every sweep run, base first."""
    _check_axes(params)
    return [(_run_params(params, _overrides(params, setting)), setting, i == 0)
            for i, (setting, _) in enumerate(_settings(params))]


def run_fingerprint(run_params: Params) -> str:
    """What the resume markers compare: the run params' fingerprint without the ablation section."""
    return run_params.fingerprint(exclude=FINGERPRINT_EXCLUDE)


def read_json(path: Path) -> Optional[dict]:
    """A JSON file's content, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def run_status(run_dir: Path, fingerprint: str) -> str:
    """done / failed / started (with these params), stale (other params) or pending (no folder)."""
    done = read_json(run_dir / DONE_MARKER)
    if done and done.get("params_hash") == fingerprint:
        return "done"
    start = read_json(run_dir / START_MARKER)
    if start and start.get("params_hash") == fingerprint:
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
        rp = _run_params(params, _overrides(params, setting))
        rows.append({"run": rp.run.name, "base": i == 0, "varied": varied or "(base)", **setting,
                     "max_steps": rp.train.max_steps, "max_images": rp.evaluate.max_images,
                     "status": run_status(Path(rp.run_dir), run_fingerprint(rp)), "run_dir": str(rp.run_dir)})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------

def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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


def _write_plan(params: Params, plans: list[tuple[Params, str]], notebooks: Sequence[str]) -> Path:
    root = sweep_root(params)
    return atomic_write_json(root / "sweep.json", {
        "base_params": params.source_file, "base_run": params.run.name, "mode": params.ablation.mode,
        "notebooks": list(notebooks), "written": _now(),
        "runs": [{"run": rp.run.name, "base": i == 0, "setting": base_setting(rp), "params_hash": fp,
                  "params_file": str(Path(rp.run_dir) / "params.yaml"), "run_dir": str(rp.run_dir)}
                 for i, (rp, fp) in enumerate(plans)],
    })


def _set_aside(root: Path, run_dir: Path) -> Path:
    """Move a run folder holding other params to ``_superseded/<run>-<old fingerprint>``."""
    old = (read_json(run_dir / START_MARKER) or read_json(run_dir / DONE_MARKER) or {}).get("params_hash", "old")
    dest = root / SUPERSEDED_DIR / f"{run_dir.name}-{old}"
    if dest.exists():
        dest = dest.with_name(f"{dest.name}-{int(time.time())}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(run_dir), str(dest))
    return dest


def _run_one(rp: Params, fp: str, notebooks: Sequence[str], runner: Callable[..., Any], say: Callable[[str], Any],
             log_output: bool, progress_bar: bool) -> Optional[dict]:
    """Run one sweep run's notebooks in its folder; its failure (or None), markers written."""
    name, run_dir = rp.run.name, Path(rp.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / DONE_MARKER).unlink(missing_ok=True)
    params_file = save_resolved(rp)
    atomic_write_json(run_dir / START_MARKER, {"run": name, "params_hash": fp, "params_file": str(params_file),
                                               "started": _now()})
    t0 = time.time()
    for nb in notebooks:
        say(f"▶ {nb}")
        try:
            runner(nb, params_file, name, run_dir, {}, log_output=log_output, progress_bar=progress_bar)
        except Exception as exc:  # NotebookFailed, a dead kernel, a missing notebook: record, go on
            failure = _failure(name, nb, exc, run_dir / f"{nb}.ipynb")
            say(f"✘ {nb} failed: {failure['error']}")
            atomic_write_json(run_dir / START_MARKER, {**(read_json(run_dir / START_MARKER) or {}), "failure": failure})
            return failure
    atomic_write_json(run_dir / DONE_MARKER, {
        "run": name, "params_hash": fp, "params_file": str(params_file), "notebooks": list(notebooks),
        "seconds": round(time.time() - t0, 1), "finished": _now()})
    return None


def sweep(params: Params, *, runner: Optional[Callable[..., Any]] = None,
          notebooks: Sequence[str] = SWEEP_NOTEBOOKS, echo: Callable[[str], Any] = print,
          log_output: bool = False, progress_bar: bool = False, force: bool = False,
          check_data: bool = True) -> dict[str, Any]:
    """Run every sweep run's notebooks (03 then 04) with papermill, in order.

    Writes ``<sweep root>/sweep.json`` (the plan) and, per run, its resolved params to
    ``<sweep root>/<run>/params.yaml`` (the file papermill hands the notebooks); executed notebooks go
    into the same folder. A run whose ``DONE.json`` holds the same :func:`run_fingerprint` is skipped
    (``force`` runs it again: training and captioning resume and are no-ops when finished, 04 scores
    again). A run folder holding other params is moved to ``<sweep root>/_superseded/<run>-<old
    fingerprint>/`` first. A failing notebook ends that run only; the sweep goes on and every failure
    is listed at the end. The base run folder is locked (``io.run_lock``) while the sweep runs.

    ``runner`` (tests) replaces :func:`jpcap_helpers.runner.run_notebook` with the same signature.
    Returns ``{"root", "runs": [{run, status, seconds, run_dir, params_file}], "failures": [{run,
    notebook, cell, error, executed}], "seconds"}``; status is done (now), skipped or failed.
    """
    if runner is None:
        from ..runner import run_notebook as runner
    runs = sweep_runs(params)                       # validates every run before anything runs
    if check_data:
        _preflight(params)
    with run_lock(params.run_dir, "sweep"):
        root = sweep_root(params)
        plans = [(rp, run_fingerprint(rp)) for rp, _, _ in runs]
        _write_plan(params, plans, notebooks)
        echo(f"sweep: {len(plans)} run(s) of {params.run.name} ({params.ablation.mode}) → {root}")
        results, failures = [], []
        start_all = time.time()
        for i, (rp, fp) in enumerate(plans, start=1):
            name, run_dir = rp.run.name, Path(rp.run_dir)
            params_file = str(run_dir / "params.yaml")

            def say(msg: str, _prefix=f"[{i}/{len(plans)}] {name}: ") -> None:
                echo(_prefix + msg)

            status = run_status(run_dir, fp)
            if status == "done" and not force:
                say("finished before with the same params, skipped")
                results.append({"run": name, "status": "skipped", "seconds": 0.0, "run_dir": str(run_dir),
                                "params_file": params_file})
                continue
            if status == "stale":
                say(f"its folder held other params; moved to {_set_aside(root, run_dir)}")
            t0 = time.time()
            failure = _run_one(rp, fp, notebooks, runner, say, log_output, progress_bar)
            seconds = time.time() - t0
            if failure:
                failures.append(failure)
            else:
                say(f"✔ in {seconds:.0f}s")
            results.append({"run": name, "status": "failed" if failure else "done", "seconds": seconds,
                            "run_dir": str(run_dir), "params_file": params_file})
    total = time.time() - start_all
    counts = {s: sum(r["status"] == s for r in results) for s in ("done", "skipped", "failed")}
    echo(f"sweep: {counts['done']} run, {counts['skipped']} skipped, {counts['failed']} failed in {total:.0f}s")
    for f in failures:
        cell = f"cell {f['cell']}" if f["cell"] is not None else "no cell"
        echo(f"  ✘ {f['run']} · {f['notebook']} · {cell}: {f['error']}  ({f['executed']})")
    return {"root": str(root), "runs": results, "failures": failures, "seconds": total}
