"""Headless execution of the numbered notebooks with papermill (``jpcap run``) and, later, sweeps.

The notebooks are kept as jupytext ``py:percent`` files (the paired ``.ipynb`` carry no outputs);
papermill cannot read ``.py`` notebooks, so each is converted in memory with jupytext first.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from .io import run_lock
from .params import load_params, save_resolved

NOTEBOOKS = ["01_data", "02_zero_shot", "03_qlora_train", "04_eval", "05_ablations", "06_failure_cases"]


class NotebookFailed(RuntimeError):
    """A notebook raised: names the notebook, the cell and the error."""


def notebooks_dir() -> Path:
    """The project's ``notebooks/`` folder (next to the installed package in a checkout)."""
    here = Path(__file__).resolve().parent.parent / "notebooks"
    if here.is_dir():
        return here
    cwd = Path.cwd()
    for cand in (cwd / "notebooks", cwd):
        if (cand / "01_data.py").exists():
            return cand
    raise FileNotFoundError("cannot find the notebooks/ folder: run from the project checkout")


def select(only: Optional[str | Sequence[str]]) -> list[str]:
    """Notebook names selected by ``--only 01,03`` (numbers or full names), in run order."""
    if not only:
        return list(NOTEBOOKS)
    wanted = [w.strip() for w in (only.split(",") if isinstance(only, str) else only) if w.strip()]
    chosen = []
    for w in wanted:
        match = [n for n in NOTEBOOKS if n == w or n.split("_")[0] == w.zfill(2)]
        if not match:
            raise ValueError(f"--only {w!r}: no such notebook (choose from {', '.join(NOTEBOOKS)})")
        chosen += match
    return [n for n in NOTEBOOKS if n in chosen]


def load_notebook(name: str, folder: Optional[Path] = None):
    """The notebook ``name`` as an nbformat object, read from its py:percent file."""
    import jupytext

    folder = folder or notebooks_dir()
    py = folder / f"{name}.py"
    if not py.exists():
        raise FileNotFoundError(f"notebook source not found: {py}")
    nb = jupytext.read(py)
    nb.metadata.setdefault("kernelspec", {"name": "python3", "display_name": "Python 3", "language": "python"})
    return nb


@dataclass
class NotebookResult:
    name: str
    output: Path
    seconds: float


def run_notebook(name: str, params_file: str | os.PathLike, run_name: str, out_dir: Path,
                 overrides: Optional[dict[str, Any]] = None, log_output: bool = False,
                 progress_bar: bool = True, folder: Optional[Path] = None) -> NotebookResult:
    """Execute one notebook with papermill; raise NotebookFailed naming notebook and cell."""
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    folder = Path(folder) if folder else notebooks_dir()
    nb = load_notebook(name, folder)
    output = out_dir / f"{name}.ipynb"
    parameters = {"params_file": str(Path(params_file).resolve()), "run_name": run_name,
                  "overrides": dict(overrides or {})}
    start = time.time()
    try:
        pm.execute_notebook(nb, str(output), parameters=parameters, kernel_name="python3",
                            cwd=str(folder), log_output=log_output, progress_bar=progress_bar,
                            language="python")
    except PapermillExecutionError as e:
        source = (e.source or "").strip().splitlines()
        first = source[0] if source else ""
        raise NotebookFailed(
            f"{name} failed in cell {e.cell_index} (execution {e.exec_count}: {first!r}): "
            f"{e.ename}: {e.evalue}\n  executed copy with the traceback: {output}") from None
    return NotebookResult(name, output, time.time() - start)


def run_notebooks(params_file: str | os.PathLike, only: Optional[str | Sequence[str]] = None,
                  run_name: Optional[str] = None, overrides: Optional[dict[str, Any]] = None,
                  log_output: bool = False, echo=print, folder: Optional[Path] = None,
                  progress_bar: bool = True) -> list[NotebookResult]:
    """Run the selected notebooks in order on one params file; stop at the first failure."""
    names = select(only)
    over = dict(overrides or {})
    if run_name:
        over["run.name"] = run_name
    params = load_params(params_file, over)       # validate before any notebook starts
    out_dir = params.run_dir
    results = []
    with run_lock(out_dir, "jpcap run"):          # the notebooks' kernels inherit the lock
        save_resolved(params)
        echo(f"jpcap run: {len(names)} notebook(s) on {params_file} → {out_dir}")
        for name in names:
            echo(f"▶ {name}")
            res = run_notebook(name, params_file, params.run.name, out_dir, overrides, log_output=log_output,
                               progress_bar=progress_bar, folder=folder)
            echo(f"✔ {name} in {res.seconds:.0f}s → {res.output}")
            results.append(res)
    total = sum(r.seconds for r in results)
    echo(f"done: {len(results)} notebook(s) in {total:.0f}s; executed notebooks in {out_dir}")
    return results
