"""Checkpoints: written atomically every ``train.save_every`` steps, read back without unpickling
anything, and the rule for which params may change between a kill and a resume.

A checkpoint folder ``<run_dir>/checkpoints/step-N/`` holds::

    state.json                   step, data position, counters, process count, fingerprint, schedule length
    pair_rows.npy                the training pairs (row numbers of the source file), int64
    epoch_order.npy              the current epoch's sample order, int64
    pair_grids.npy               train.group_by_grid only: each pair's visual grid, int64 (h0, w0, h1, w1, …)
    adapter/                     adapter_model.safetensors + adapter_config.json (PEFT)
    optimizer.pt, scheduler.pt   state dicts of tensors and numbers (torch.load(weights_only=True))
    scaler.pt                    fp16 only, likewise
    rng_rank<r>.safetensors      each process's RNG state (see .rng)

Every file is read by a loader that cannot run code (json, numpy without pickle, safetensors,
``torch.load(weights_only=True)``); a file that is not what it should be stops the resume with a
TrainError naming it. accelerate's ``save_state``/``load_state`` are not used: they write the whole
prepared model (the frozen base too, gigabytes) instead of the adapter, and their RNG file is a
pickle of python/numpy objects.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .errors import TrainError
from .rng import load_rng_state, rng_state, save_rng_state

__all__ = ["KEEP_CHECKPOINTS", "RESUME_FREE_KEYS", "COUNTERS", "resume_fingerprint", "checkpoints_dir",
           "list_checkpoints", "Checkpoint", "load_checkpoint", "save_checkpoint", "apply_checkpoint"]

KEEP_CHECKPOINTS = 2

# params that may change between a kill and a resume: they do not change the steps already taken
RESUME_FREE_KEYS = (
    # how far to train: the LR schedule stays the one the run started with (state.json
    # "schedule_steps"), so a shorter run stops earlier on the same curve
    "train.max_steps", "train.epochs",
    # cadence of validation and checkpoints, and what happens after training
    "train.eval_every", "train.eval_images", "train.save_every", "train.merge_adapter",
    # how validation captions are decoded (generation.prompt stays: every training sample holds it)
    "generation.batch_size", "generation.max_new_tokens", "generation.num_beams", "generation.decoder",
    "generation.grid_buckets", "generation.warmup", "generation.merge_qlora_adapter", "generation.fp8",
    # other stages
    "zero_shot", "evaluate", "ablation",
    # where files live (the training pairs themselves are checked by their digest)
    "data.root", "data.images_dir", "data.processed_dir", "model.models_dir",
)

# run counters kept across sessions, with their starting values
COUNTERS = {"non_finite_loss_steps": 0, "non_finite_grad_steps": 0, "overflow_steps": 0,
            "consecutive_non_finite": 0, "missing_image_samples": 0, "elapsed_s": 0.0}


def resume_fingerprint(params: Any) -> str:
    """What a checkpoint depends on: every param except :data:`RESUME_FREE_KEYS` (and run location)."""
    return params.fingerprint(exclude=RESUME_FREE_KEYS)


def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints ``(step, path)`` of a run, oldest first."""
    folder = checkpoints_dir(run_dir)
    out = []
    if folder.is_dir():
        for p in folder.iterdir():
            m = re.fullmatch(r"step-(\d+)", p.name)
            if m and p.is_dir() and (p / "state.json").is_file():
                out.append((int(m.group(1)), p))
    return sorted(out)


# ---------------------------------------------------------------------------------------------
# reading: every file with a loader that cannot run code
# ---------------------------------------------------------------------------------------------

def _refuse(path: Path, what: str, error: Exception) -> TrainError:
    folder = next((p for p in path.parents if p.name.startswith("step-")), path.parent)
    return TrainError(f"{path}: not a valid {what} ({type(error).__name__}: {str(error)[:200]}); nothing in it "
                      f"was run or unpickled. The checkpoint is damaged or was altered: delete {folder} to "
                      "resume from the one before, or train(params, resume=False) to start over")


def _read_json(path: Path, what: str) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise _refuse(path, what, e) from None
    if not isinstance(value, dict):
        raise _refuse(path, what, ValueError(f"expected a JSON object, got {type(value).__name__}"))
    return value


def _read_npy(path: Path, what: str) -> np.ndarray:
    try:
        value = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise _refuse(path, what, e) from None
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "iu" or value.ndim != 1:
        if hasattr(value, "close"):   # a zip file opens as an (unread) .npz archive
            value.close()
        raise _refuse(path, what, ValueError("expected a 1-D integer array"))
    return value


def _read_torch(path: Path, what: str) -> Any:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError (a forbidden global), RuntimeError (not a torch file), ...
        raise _refuse(path, what, e) from None


def _read_safetensors(path: Path, what: str) -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # SafetensorError, OSError
        raise _refuse(path, what, e) from None


def _read_grids(path: Path) -> np.ndarray:
    """``pair_grids.npy``: (height, width) per pair, stored flat."""
    flat = _read_npy(path, "visual grids of the pairs (.npy)")
    if len(flat) % 2:
        raise _refuse(path, "visual grids of the pairs (.npy)", ValueError("odd length"))
    return flat.reshape(-1, 2)


@dataclass
class Checkpoint:
    """A checkpoint read into memory (validated against the params, not yet applied)."""
    path: Path
    step: int
    epoch: int
    step_in_epoch: int
    world_size: int
    schedule_steps: int
    pairs_digest: str
    pair_rows: np.ndarray
    epoch_order: np.ndarray
    counters: dict
    adapter: dict = field(repr=False)
    optimizer: dict = field(repr=False)
    scheduler: dict = field(repr=False)
    scaler: Optional[dict] = field(repr=False)
    rng: dict = field(repr=False)
    pair_grids: Optional[np.ndarray] = field(default=None, repr=False)   # train.group_by_grid


def load_checkpoint(path: str | os.PathLike, params: Any, rank: int = 0) -> Checkpoint:
    """Read checkpoint ``path`` for process ``rank``; refused when it was written with params that
    change the result (see :data:`RESUME_FREE_KEYS`) or when any file is not what it should be."""
    path = Path(path)
    state = _read_json(path / "state.json", "checkpoint state (JSON)")
    if state.get("fingerprint") != resume_fingerprint(params):
        raise TrainError(f"{path}: the checkpoint was written with other params (something that changes the "
                         "result: data, model or train section, seed or prompt): use another run.name, or "
                         "train(resume=False) to start over in this run folder. Free to change on a resume: "
                         + ", ".join(RESUME_FREE_KEYS))
    try:
        position = {k: int(state[k]) for k in ("step", "epoch", "step_in_epoch", "world_size", "schedule_steps")}
        digest = str(state["pairs_digest"])
    except (KeyError, TypeError, ValueError) as e:
        raise _refuse(path / "state.json", "checkpoint state (JSON)", e) from None
    _read_json(path / "adapter" / "adapter_config.json", "PEFT adapter config (JSON)")
    scaler_path, grids_path = path / "scaler.pt", path / "pair_grids.npy"
    return Checkpoint(
        path=path, **position, pairs_digest=digest,
        pair_rows=_read_npy(path / "pair_rows.npy", "training-pair index (.npy)"),
        epoch_order=_read_npy(path / "epoch_order.npy", "epoch order (.npy)"),
        counters={k: state.get(k, v) for k, v in COUNTERS.items()},
        adapter=_read_safetensors(path / "adapter" / "adapter_model.safetensors", "adapter (safetensors)"),
        optimizer=_read_torch(path / "optimizer.pt", "optimizer state"),
        scheduler=_read_torch(path / "scheduler.pt", "scheduler state"),
        scaler=_read_torch(scaler_path, "GradScaler state") if scaler_path.exists() else None,
        rng=load_rng_state(path / f"rng_rank{rank}.safetensors"),
        pair_grids=_read_grids(grids_path) if grids_path.exists() else None,
    )


def apply_checkpoint(session: Any, ckpt: Checkpoint) -> dict:
    """Put the checkpoint's adapter, optimizer, scheduler and scaler state into ``session``; returns
    its RNG state (restored by the caller right before the first step)."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    if ckpt.world_size != session.world:
        raise TrainError(f"{ckpt.path}: saved with {ckpt.world_size} process(es), resuming with "
                         f"{session.world}: the data order per process would differ; resume with the same count")
    if not np.array_equal(ckpt.epoch_order, session.sample_order(ckpt.epoch)):
        raise TrainError(f"{ckpt.path}: the epoch's sample order differs from the saved one (numpy changed?)")
    model = session.accelerator.unwrap_model(session.loss_module).model
    result = set_peft_model_state_dict(model, ckpt.adapter)
    if getattr(result, "unexpected_keys", None):
        raise TrainError(f"{ckpt.path}: unexpected adapter weights {result.unexpected_keys[:3]}")
    lacking = set(get_peft_model_state_dict(model)) - set(ckpt.adapter)
    if lacking:
        raise TrainError(f"{ckpt.path}: the checkpoint lacks weights {sorted(lacking)[:3]}")
    session.optimizer.load_state_dict(ckpt.optimizer)
    session.scheduler.load_state_dict(ckpt.scheduler)
    scaler = session.accelerator.scaler
    if scaler is not None and ckpt.scaler is not None:
        scaler.load_state_dict(ckpt.scaler)
    return ckpt.rng


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------

def save_checkpoint(session: Any, step: int, position: dict, counters: dict) -> Path:
    """Write ``checkpoints/step-<step>/`` (via ``.tmp-step-<step>/`` and a rename) and keep the last
    :data:`KEEP_CHECKPOINTS`. Every process saves its RNG state; the main process the rest."""
    import torch

    from ..io import atomic_write_json

    acc = session.accelerator
    folder = checkpoints_dir(session.params.run_dir)
    final, tmp = folder / f"step-{step}", folder / f".tmp-step-{step}"
    if session.main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    save_rng_state(tmp / f"rng_rank{session.rank}.safetensors", rng_state())
    acc.wait_for_everyone()
    if session.main:
        adapter = tmp / "adapter"
        acc.unwrap_model(session.loss_module).model.save_pretrained(adapter)
        (adapter / "README.md").unlink(missing_ok=True)   # a model card: nothing a resume reads
        torch.save(session.optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(session.scheduler.state_dict(), tmp / "scheduler.pt")
        if acc.scaler is not None:
            torch.save(acc.scaler.state_dict(), tmp / "scaler.pt")
        pairs = session.data.pairs
        np.save(tmp / "pair_rows.npy", np.asarray([p["row"] for p in pairs], dtype=np.int64))
        np.save(tmp / "epoch_order.npy", session.sample_order(position["epoch"]))
        if session.data.grids is not None:
            np.save(tmp / "pair_grids.npy", np.asarray(session.data.grids, dtype=np.int64).reshape(-1))
        atomic_write_json(tmp / "state.json", {
            "step": step, **position, **counters, "world_size": session.world,
            "fingerprint": resume_fingerprint(session.params), "pairs_digest": session.data.digest,
            "n_pairs": len(pairs), "schedule_steps": session.schedule_steps, "seed": session.params.run.seed,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        })
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in list_checkpoints(session.params.run_dir)[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final
