"""The Colab face: where the notebook runs, which GPU it has, and Google Drive for outputs."""
from __future__ import annotations

import platform
import sys
from typing import Optional


def in_colab() -> bool:
    return "google.colab" in sys.modules


def gpu_info() -> dict:
    """Name, memory and bf16 support of GPU 0 (``{"gpu": None}`` without one)."""
    import torch

    if not torch.cuda.is_available():
        return {"gpu": None, "memory_gib": 0.0, "bf16": False, "compute_capability": None}
    props = torch.cuda.get_device_properties(0)
    return {
        "gpu": props.name,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "bf16": bool(torch.cuda.is_bf16_supported()),
        "compute_capability": f"{props.major}.{props.minor}",
        "count": torch.cuda.device_count(),
    }


def report_environment(params=None) -> dict:
    """Print and return what this run stands on: Python, libraries, GPU, chosen precision."""
    import importlib.metadata as md

    info = {"python": platform.python_version(), "colab": in_colab()}
    for pkg in ("torch", "transformers", "peft", "bitsandbytes", "jpcap"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            info[pkg] = None
    info.update(gpu_info())
    if params is not None:
        from .models import choose_dtype
        info["precision"] = str(choose_dtype(params.model.precision)).replace("torch.", "")
        info["run_dir"] = str(params.run_dir)
        info["params_hash"] = params.hash()
    gpu = (f"{info['gpu']} ({info['memory_gib']} GiB, bf16 {'yes' if info['bf16'] else 'no'})"
           if info["gpu"] else "none (CPU only)")
    print(f"GPU: {gpu}")
    print("versions: " + ", ".join(f"{k} {info[k]}" for k in ("python", "torch", "transformers", "peft",
                                                             "bitsandbytes") if info.get(k)))
    if params is not None:
        print(f"precision: {info['precision']} · run folder: {info['run_dir']} · params {info['params_hash']}")
    return info


def mount_drive(mount_point: str = "/content/drive") -> Optional[str]:
    """Mount Google Drive in Colab; returns the mount point, or None outside Colab."""
    if not in_colab():
        print("mount_drive: not in Colab, outputs stay local")
        return None
    from google.colab import drive  # type: ignore[import-not-found]

    drive.mount(mount_point)
    return mount_point
