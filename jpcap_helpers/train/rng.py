"""Random-number state (python, numpy, torch CPU, CUDA) captured, restored and stored without pickle.

On disk one ``.safetensors`` file per process: the torch CPU and CUDA generator states as uint8
tensors, python's and numpy's states as JSON in the file's metadata. Nothing is unpickled on load.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np

from .errors import TrainError

__all__ = ["rng_state", "set_rng_state", "save_rng_state", "load_rng_state"]


def rng_state() -> dict:
    """The current state of every generator training draws from."""
    import torch

    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(legacy=False),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` (or :func:`load_rng_state`) returned."""
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_to_json(state: dict) -> str:
    inner = state["state"]
    return json.dumps({**state, "state": {"key": np.asarray(inner["key"]).tolist(), "pos": int(inner["pos"])}})


def _numpy_from_json(text: str) -> dict:
    state = json.loads(text)
    state["state"]["key"] = np.asarray(state["state"]["key"], dtype=np.uint32)
    return state


def _python_from_json(text: str) -> tuple:
    version, internal, gauss_next = json.loads(text)
    return int(version), tuple(int(v) for v in internal), gauss_next


def save_rng_state(path: str | Path, state: dict) -> Path:
    """Write ``state`` (from :func:`rng_state`) to ``path`` (``.safetensors``)."""
    from safetensors.torch import save_file

    tensors = {"torch": state["torch"].contiguous()}
    for i, s in enumerate(state.get("cuda", [])):
        tensors[f"cuda.{i}"] = s.cpu().contiguous()
    version, internal, gauss_next = state["python"]
    metadata = {"python": json.dumps([version, list(internal), gauss_next]), "numpy": _numpy_to_json(state["numpy"])}
    save_file(tensors, str(path), metadata=metadata)
    return Path(path)


def load_rng_state(path: str | Path) -> dict:
    """Read a state written by :func:`save_rng_state`; a TrainError naming the file when it is not one."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        state: dict[str, Any] = {"python": _python_from_json(metadata["python"]),
                                 "numpy": _numpy_from_json(metadata["numpy"]), "torch": tensors["torch"]}
    except Exception as e:  # not safetensors, or not ours: refuse, naming the file
        raise TrainError(f"{path}: not a valid RNG state file ({type(e).__name__}: {e}); the checkpoint is "
                         "damaged — delete this checkpoint folder to resume from the one before") from None
    cuda = sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k.split(".")[1]))
    if cuda:
        state["cuda"] = [tensors[k] for k in cuda]
    return state
