"""What every notebook's first code cell calls: :func:`setup` — validate the params, mount Drive and
check the persistent folder (Colab), create the run folder, save the resolved params, report the
environment. Everything that can fail here fails before any model or data loads, in one line."""
from __future__ import annotations

import os
import platform
import uuid
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from . import colab
from .params import Params, ParamsError, load_params, save_resolved


def check_writable(folder: str | os.PathLike, key: str) -> Path:
    """Create ``folder`` and prove it is writable; raise ParamsError naming ``key`` and the fix."""
    folder = Path(folder)
    probe = folder / f".jpcap-write-test-{uuid.uuid4().hex[:8]}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok", encoding="utf-8")
        probe.unlink()
    except OSError as e:
        raise ParamsError(f"{key}: {folder} is not a writable folder ({e.strerror or e}); "
                          "choose a folder you can write to") from None
    return folder


def use_persistent_folder(params: Params) -> None:
    """Point the Hugging Face cache into ``run.persist_dir`` (downloads survive the runtime; unless
    ``run.model_cache: local``) and prove the folder is writable. The data, model and output paths already resolve inside it (params)."""
    persist = check_writable(params.run.persist_dir, "run.persist_dir")
    if params.run.model_cache == "persist":  # "local": downloads stay on the runtime's disk (a free Drive
        os.environ.setdefault("HF_HOME", str(persist / "hf_cache"))  # has 15 GB; the baselines need ≈ 35)


def apply_cpu_threads(params: Params) -> Optional[int]:
    """``torch.set_num_threads(run.cpu_threads)`` when set (None: torch's default); returns the count set.
    On a small shared CPU one thread avoids OpenMP spin-wait thrash: measured on 2 shared cores, a
    training step of the tiny model took 0.15 s with 1 thread and 5–7 s with 2 while other jobs ran."""
    n = params.run.cpu_threads
    if n is None:
        return None
    import torch

    torch.set_num_threads(n)
    return n


def setup(params_file: str | os.PathLike, run_name: Optional[str] = None,
          overrides: Optional[Mapping[str, Any] | Sequence[str]] = None, report: bool = True) -> Params:
    """Validate ``params_file`` (+ overrides), prepare the runtime and the run folder; return the Params.

    ``run_name`` None keeps the file's ``run.name``. On Colab with ``run.mount_drive`` Drive is mounted
    first; with ``run.persist_dir`` the data, model cache, checkpoints and predictions live there, so each
    notebook can run in a fresh runtime after its predecessors ran in others.
    """
    over = dict(overrides or {}) if isinstance(overrides, Mapping) or overrides is None else list(overrides)
    if run_name:
        over = {**over, "run.name": run_name} if isinstance(over, dict) else [*over, f"run.name={run_name}"]
    params = load_params(params_file, over, check_paths=False)   # types and ranges before anything else
    if params.run.mount_drive:
        colab.mount_drive()
    params = load_params(params_file, over)                       # now the paths (Drive is there)
    if params.run.persist_dir:
        use_persistent_folder(params)
    check_writable(params.run_dir, "run.output_dir")
    apply_cpu_threads(params)
    save_resolved(params)
    colab.enable_widgets()
    if report:
        report_environment(params)
    return params


def login_for_gated_models(params: Params) -> list[str]:
    """Log in to the Hugging Face hub when a model of this run is gated (PaliGemma, Japanese Stable VLM):
    Colab secret ``HF_TOKEN``, the environment, or an interactive prompt. Returns the gated models."""
    from .models import REGISTRY

    names = dict.fromkeys([*params.zero_shot.models, params.model.name])
    gated = [n for n in names if n in REGISTRY and REGISTRY[n].gated]
    if gated:
        print(f"gated on the hub: {', '.join(gated)} — accept each licence on its hub page, then log in")
        colab.hf_login()
    return gated


def report_environment(params: Optional[Params] = None) -> dict:
    """Print and return what this run stands on: Python, libraries, GPU, native bf16, chosen precision."""
    import importlib.metadata as md

    info: dict[str, Any] = {"python": platform.python_version(), "colab": colab.in_colab()}
    for pkg in ("torch", "transformers", "peft", "bitsandbytes", "jpcap"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            info[pkg] = None
    info.update(colab.gpu_info())
    from .models import bf16_native, choose_dtype

    info["bf16_native"] = bf16_native()
    gpu = (f"{info['gpu']} ({info['memory_gib']} GiB, compute capability {info['compute_capability']}, "
           f"native bf16 {'yes' if info['bf16_native'] else 'no'})" if info["gpu"] else "none (CPU only)")
    print(f"GPU: {gpu}")
    print("versions: " + ", ".join(f"{k} {info[k]}" for k in ("python", "torch", "transformers", "peft",
                                                             "bitsandbytes") if info.get(k)))
    if params is not None:
        info["precision"] = str(choose_dtype(params.model.precision)).replace("torch.", "")
        info["run_dir"] = str(params.run_dir)
        info["params_fingerprint"] = params.fingerprint()
        print(f"precision: {info['precision']} · run folder: {info['run_dir']} · params {info['params_fingerprint']}")
        if params.run.persist_dir:
            print(f"persistent folder: {params.run.persist_dir} (data, model cache, checkpoints, predictions)")
        if not info["gpu"] and not params.model.name.startswith("tiny-"):
            print(f"WARNING: no GPU, and {params.model.name} is a real model: on a CPU this takes days. "
                  "In Colab: Runtime → Change runtime type → T4 GPU, then run the notebook again.")
    return info
