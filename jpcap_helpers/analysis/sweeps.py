"""Ablation sweeps over LoRA rank, LoRA depth, projector freezing and the base model (docs/ablations.md):
expansion of the params' ``ablation`` section into runs, and the resumable papermill runner.

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
from ..models.registry import REGISTRY, ModelError, finetunable
from ..params import Params, ParamsError, save_resolved

# the model axis comes last: without it, runs, their order and their names are what they were before it
AXES = ("lora_rank", "top_k_layers", "projector", "model")
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

def model_slug(name: str) -> str:
    """A model's part of run names: a registry key as it is, else the last part of the folder (or hub
    id), lower-cased, each run of characters other than ``a-z 0-9 . _ -`` made one ``-``."""
    last = name if name in REGISTRY else Path(name).name
    return re.sub(r"[^a-z0-9._-]+", "-", last.lower()).strip("-.") or "model"


def setting_label(setting: dict, base_model: str) -> str:
    """``r8-top6-proj_trainable`` for {lora_rank: 8, top_k_layers: 6, projector: trainable}; a setting
    whose ``model`` is not ``base_model`` (the base params' ``model.name``) ends in the model's slug,
    ``r32-top6-proj_trainable-qwen3-vl-2b-instruct``, so runs of the base model keep their names."""
    label = f"r{setting['lora_rank']}-top{setting['top_k_layers']}-proj_{setting['projector']}"
    model = setting.get("model", base_model)
    return label if model == base_model else f"{label}-{model_slug(model)}"


def run_name(base_name: str, setting: dict, base_model: str) -> str:
    """Deterministic sweep run name: ``<base run name>-<setting_label>``."""
    return f"{base_name}-{setting_label(setting, base_model)}"


def base_setting(params: Params) -> dict:
    """The base params' own values of the axes (the seed default: r32, top 6, trainable, its model)."""
    return {"lora_rank": params.train.lora_rank, "top_k_layers": params.train.top_k_layers,
            "projector": params.train.projector, "model": params.model.name}


def sweep_root(params: Params) -> Path:
    """``<base run>/sweep``: the sweep plan and the runs' folders."""
    return Path(params.run_dir) / "sweep"


def reports_dir(params: Params) -> Path:
    """``<base run>/reports``: the comparison's tables and figures."""
    return Path(params.run_dir) / "reports"


def _where(params: Params) -> str:
    return params.source_file or "params"


def _fine_tunable(params: Params, key: str, name: str) -> str:
    """``name`` as a run's ``model.name``: a registry key for a key or hub id, an absolute path for a
    local folder (the runs' notebooks start elsewhere). Refused, naming ``key``, unless 03 can
    fine-tune it (``registry.finetunable``)."""
    try:
        entry = finetunable(name)
    except ModelError as e:
        raise ParamsError(f"{_where(params)}: {key}: {e}") from None
    return entry.key if entry.key in REGISTRY else str(Path(name).resolve())


def _model_values(params: Params) -> list[str]:
    """The ``ablation.model`` values as the runs get them (:func:`_fine_tunable`); a value naming the
    base's model becomes the base's own ``model.name``. Nothing is resolved when the list is empty.
    Refused, naming the key: an unknown or untrainable model (the base's too), a model listed twice,
    two models with one slug (run names would clash), ``model.revision`` set (one commit for all)."""
    names = params.ablation.model
    if not names:
        return []
    base = params.model.name
    base_id = _fine_tunable(params, "model.name", base)
    values: list[str] = []
    slugs: dict[str, str] = {}   # slug → the value that has it, among the runs' other models
    for i, name in enumerate(names):
        key = f"ablation.model[{i}]"
        value = _fine_tunable(params, key, name)
        value = base if value == base_id else value
        if value in values:
            raise ParamsError(f"{_where(params)}: {key}: {name!r} is listed twice")
        if value != base:
            if params.model.revision:
                raise ParamsError(f"{_where(params)}: {key}: model.revision ({params.model.revision}) pins "
                                  f"{base}'s commit and would load {name!r} at it: remove model.revision "
                                  "or sweep the models in separate params files")
            clash = slugs.setdefault(model_slug(value), value)
            if clash != value:
                raise ParamsError(f"{_where(params)}: {key}: {name!r} and {clash!r} share the run-name part "
                                  f"{model_slug(value)!r}: rename one folder")
        values.append(value)
    return values


def _axis_values(params: Params) -> dict[str, list]:
    """Each axis's values in list order, checked: a value listed twice is refused naming the key
    (``ablation.lora_rank[1]``), the models as :func:`_model_values`; the other values' types and
    ranges are checked by the params schema."""
    values = {axis: list(getattr(params.ablation, axis)) for axis in AXES if axis != "model"}
    for axis, vals in values.items():
        for i, v in enumerate(vals):
            if v in vals[:i]:
                raise ParamsError(f"{_where(params)}: ablation.{axis}[{i}]: {v!r} is listed twice")
    values["model"] = _model_values(params)
    return values


def _settings(params: Params) -> list[tuple[dict, Optional[str]]]:
    """Ordered (setting, varied axis) pairs: the base first (varied None), then one axis at a time
    in axis and list order, or the grid in list order; duplicates of the base dropped."""
    base = base_setting(params)
    out: list[tuple[dict, Optional[str]]] = [(base, None)]
    a = params.ablation
    values = _axis_values(params)
    if a.mode == "one_factor":
        for axis in AXES:
            for v in values[axis]:
                s = {**base, axis: v}
                if s != base:
                    out.append((s, axis))
    else:
        lists = [values[axis] or [base[axis]] for axis in AXES]
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


def swept_axes(params: Params) -> list[str]:
    """The axes some run of the sweep varies, in axis order (all of them when none is varied)."""
    base = base_setting(params)
    varied = {axis for s, _ in _settings(params) for axis in AXES if s[axis] != base[axis]}
    return [axis for axis in AXES if axis in varied] or list(AXES)


def _overrides(params: Params, setting: dict) -> dict[str, Any]:
    a = params.ablation
    o: dict[str, Any] = {
        "run.name": run_name(params.run.name, setting, params.model.name),
        "run.output_dir": str(sweep_root(params).resolve()),
        "run.mount_drive": False,      # the output folder is decided already (Drive or not)
        "model.name": setting["model"],
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
    before anything runs. Keys: ``run.name``, ``run.output_dir``, ``run.mount_drive``, ``model.name``,
    ``train.lora_rank``, ``train.top_k_layers``, ``train.projector`` and, when the ablation section caps
    them, ``train.max_steps``, ``zero_shot.max_images``, ``evaluate.max_images``, ``train.eval_images``.
    Raises ParamsError naming the key for a value listed twice, a model 03 cannot fine-tune or a run
    the schema refuses."""
    runs = []
    for setting, _ in _settings(params):
        o = _overrides(params, setting)
        _run_params(params, o)
        runs.append(o)
    return runs


def sweep_runs(params: Params) -> list[tuple[Params, dict, bool]]:
    """(run params, setting, is base) of every sweep run, base first."""
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
