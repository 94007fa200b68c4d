"""``train()``: set-up (run folder, resume, plan), then for each epoch and step: forward, backward,
optimizer step, log, validate, checkpoint; at the end the adapter. One loop for every face: the tiny
model on a CPU, a free Colab T4 (fp16 + loss scaling, 4-bit), a big GPU (bf16) and several GPUs under
``accelerate launch`` / ``torchrun`` (DDP)."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from ..io import atomic_write_json, run_lock
from .checkpoint import (
    COUNTERS,
    Checkpoint,
    apply_checkpoint,
    checkpoints_dir,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from .export import export_adapter, merge_adapter
from .logs import StepLog, TrainResult, truncate_log
from .loss import caption_loss
from .packing import target_count
from .planning import format_plan, probe
from .rng import set_rng_state
from .session import TrainSession, open_session, peak_memory
from .steps import MAX_CONSECUTIVE_NONFINITE, clip_and_step, count_step, forward_backward, guard_non_finite
from .validation import validate

__all__ = ["TrainOptions", "train"]

MISSING_DRAWN = "samples skipped: image file missing when drawn"


@dataclass
class TrainOptions:
    """Levers for tests and benchmarks (not params: they are no part of a run's record)."""
    loss: Callable[[Any, dict], tuple[Any, Any]] = caption_loss   # (model, batch) → (loss sum, n tokens)
    max_consecutive_non_finite: int = MAX_CONSECUTIVE_NONFINITE


def train(params: Any, *, resume: bool = True, callbacks: Optional[Sequence[Callable[[dict], Any]]] = None,
          session_hours: Optional[float] = None, options: Optional[TrainOptions] = None) -> TrainResult:
    """Fine-tune per ``params.train``; returns a :class:`TrainResult`.

    Writes ``<run_dir>/checkpoints/step-N/`` (atomic, last 2 kept), ``train_log.jsonl``,
    ``tensorboard/``, ``train_plan.json``, ``adapter/`` and ``train_result.json``. With ``resume``
    (default) a run folder holding checkpoints continues from the newest one and follows the same
    loss curve; ``resume=False`` deletes this run's checkpoints and logs and starts over.
    ``callbacks`` are called after every optimizer step (after its validation and checkpoint) with a
    dict: step, total_steps, epoch, loss, lr, grad_norm, samples_per_s, data_s (seconds the step waited
    for its micro-batches), skipped, val_loss, val_CIDEr,
    checkpoint, model (the PEFT model, in train mode: restore it if you switch it) and processor; an
    exception raised there stops training (the next call resumes from the last checkpoint).
    ``session_hours``: see :func:`~jpcap_helpers.train.plan`. Holds the run folder's lock (the main
    process of a multi-process launch holds it for all).
    """
    options = options or TrainOptions()
    rank = int(os.environ.get("RANK", "0"))   # set by torchrun / accelerate launch, before any Accelerator
    with run_lock(params.run_dir, "train") if rank == 0 else contextlib.nullcontext():
        checkpoint = _checkpoint_to_resume(params, resume, rank)
        session = open_session(params, checkpoint, loss=options.loss)
        try:
            return _run(session, checkpoint, callbacks or (), session_hours, options)
        finally:
            session.close()


def _run(session: TrainSession, checkpoint: Optional[Checkpoint], callbacks: Sequence[Callable],
         session_hours: Optional[float], options: TrainOptions) -> TrainResult:
    import torch

    params, acc, t = session.params, session.accelerator, session.params.train
    run_dir = Path(params.run_dir)

    # ---- set-up: run folder, resume, plan ------------------------------------------------------
    if session.main:
        _prepare_run_folder(run_dir, fresh=checkpoint is None)
    acc.wait_for_everyone()
    start_step, epoch, step_in_epoch, counters, resume_rng = 0, 0, 0, dict(COUNTERS), None
    if checkpoint is not None:
        resume_rng = apply_checkpoint(session, checkpoint)
        start_step, epoch, step_in_epoch = checkpoint.step, checkpoint.epoch, checkpoint.step_in_epoch
        counters.update(checkpoint.counters)
        if session.main:
            truncate_log(run_dir / "train_log.jsonl", start_step)
    finished = _finished_result(run_dir, start_step, session.total_steps)
    if finished is not None:
        return finished
    info = probe(session, session_hours, start_step)
    if session.main:
        print(format_plan(info), flush=True)
        atomic_write_json(run_dir / "train_plan.json", info)
    if resume_rng is not None:
        set_rng_state(resume_rng)   # after the probe, which restores the RNG it found

    # ---- training ------------------------------------------------------------------------------
    log = StepLog(run_dir, start_step, session.total_steps, enabled=session.main)
    losses: dict[int, float] = {}
    last_loss, last_val = None, {"val_loss": None, "val_CIDEr": None}
    if acc.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(acc.device)
    step, seconds_before, t_session = start_step, counters["elapsed_s"], time.time()
    try:
        while step < session.total_steps:
            last = min(session.steps_per_epoch, step_in_epoch + (session.total_steps - step))
            batches = iter(session.loader(epoch, step_in_epoch, last))
            while step_in_epoch < last:
                t_step = time.perf_counter()
                micro, missing, targets, captions = _next_micro_batches(session, batches)
                data_s = time.perf_counter() - t_step   # waiting for the loader (and the copy to the device)
                captions *= session.world
                lr = session.scheduler.get_last_lr()[0]
                # the step's bookkeeping reads the device once, in clip_and_step (with a GradScaler twice)
                n_tokens, n_missing = count_step(session, micro, missing, local=targets)
                loss_sum, n_bad = forward_backward(session, micro, n_tokens)
                grad_norm, skipped, (loss_sum, n_tokens, n_missing) = clip_and_step(
                    session, n_bad, (loss_sum, n_tokens, n_missing))
                finite = skipped != "non-finite loss"
                step, step_in_epoch = step + 1, step_in_epoch + 1
                guard_non_finite(counters, skipped, step, options.max_consecutive_non_finite, checkpoints_dir(run_dir))
                _advance_schedule(session.scheduler)
                counters["missing_image_samples"] += int(n_missing)

                loss = _step_loss(loss_sum, n_tokens, finite)
                losses[step] = loss
                last_loss = loss if finite else last_loss
                row = {"step": step, "epoch": epoch + step_in_epoch / session.steps_per_epoch, "loss": loss,
                       "lr": lr, "grad_norm": grad_norm,
                       "samples_per_s": t.effective_batch_size / (time.perf_counter() - t_step),
                       "data_s": round(data_s, 4), "skipped": skipped}
                if n_missing:
                    row["missing_images"] = n_missing
                if session.data.packed is not None:   # a sample is an image's packed captions
                    row["captions_per_s"] = captions / (time.perf_counter() - t_step)

                val = {}
                if session.eval_enabled and (step % t.eval_every == 0 or step == session.total_steps):
                    if session.main:
                        val = last_val = validate(session, step)
                    acc.wait_for_everyone()
                row.update(val)
                log.add(row, flush=bool(val))

                saved = None
                if (t.save_every > 0 and step % t.save_every == 0) or step == session.total_steps:
                    log.flush()
                    counters["elapsed_s"] = seconds_before + (time.time() - t_session)
                    saved = save_checkpoint(session, step, _data_position(session, epoch, step_in_epoch), counters)
                for callback in callbacks:
                    callback({**row, "total_steps": session.total_steps, "checkpoint": str(saved) if saved else None,
                              "model": session.model, "processor": session.processor})
            if step_in_epoch >= session.steps_per_epoch:
                epoch, step_in_epoch = epoch + 1, 0
    finally:
        log.close()

    # ---- outputs -------------------------------------------------------------------------------
    return _finish(session, info, start_step, step, losses, last_loss, last_val, counters,
                   seconds_before + (time.time() - t_session))


# ---------------------------------------------------------------------------------------------
# the loop's helpers
# ---------------------------------------------------------------------------------------------

def _checkpoint_to_resume(params: Any, resume: bool, rank: int) -> Optional[Checkpoint]:
    """The newest checkpoint of the run, read and checked against ``params`` (None: start afresh)."""
    found = list_checkpoints(params.run_dir) if resume else []
    return load_checkpoint(found[-1][1], params, rank) if found else None


def _prepare_run_folder(run_dir: Path, fresh: bool) -> None:
    """Create the run folder; a fresh start deletes the logs and checkpoints a previous run left
    (also those of a run killed before its first checkpoint); half-written checkpoints always go."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if fresh:
        for name in ("checkpoints", "tensorboard", "val_predictions"):
            shutil.rmtree(run_dir / name, ignore_errors=True)
        for name in ("train_log.jsonl", "train_result.json", "train_plan.json"):
            with contextlib.suppress(FileNotFoundError):
                (run_dir / name).unlink()
    for tmp in checkpoints_dir(run_dir).glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def _finished_result(run_dir: Path, start_step: int, total_steps: int) -> Optional[TrainResult]:
    """A finished run is not trained again: its saved result."""
    result = run_dir / "train_result.json"
    if start_step >= total_steps and (run_dir / "adapter").exists() and result.exists():
        return TrainResult.from_dict(json.loads(result.read_text(encoding="utf-8")))
    return None


def _next_micro_batches(session: TrainSession, batches: Iterator[dict]) -> tuple[list[dict], int, int, int]:
    """This process's micro-batches of one step on its device; how many samples were stand-ins for a
    missing image file (masked out: they train nothing); and their target tokens and captions, counted
    before the copy to the device so that no count waits for it."""
    micro, missing, targets, captions = [], 0, 0, 0
    for _ in range(session.accum):
        batch = next(batches)
        names = batch.pop("missing_images", ())
        if names and not missing:
            warnings.warn(f"image file missing, sample skipped and counted: {names[0]} (under "
                          f"{session.params.images_dir})", stacklevel=2)
        missing += len(names)
        targets += target_count(batch)
        captions += int(batch["n_captions"]) if "n_captions" in batch else 0
        micro.append(session.to_device(batch))
    return micro, missing, targets, captions


def _advance_schedule(scheduler: Any) -> None:
    with warnings.catch_warnings():
        # a step skipped by the GradScaler makes torch warn that the scheduler stepped first
        warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*")
        scheduler.step()


def _step_loss(loss_sum: Any, n_tokens: float, finite: bool) -> float:
    """The step's mean token loss (``loss_sum``: summed over every process; NaN for a skipped step)."""
    return float(loss_sum) / n_tokens if finite else float("nan")


def _data_position(session: TrainSession, epoch: int, step_in_epoch: int) -> dict:
    """Where the next step's data starts (the next epoch once this one is used up)."""
    if step_in_epoch >= session.steps_per_epoch:
        return {"epoch": epoch + 1, "step_in_epoch": 0}
    return {"epoch": epoch, "step_in_epoch": step_in_epoch}


def _finish(session: TrainSession, info: dict, start_step: int, step: int, losses: dict, last_loss: Optional[float],
            last_val: dict, counters: dict, seconds: float) -> TrainResult:
    """Export the adapter (and merge it when asked), write ``train_result.json``; the result."""
    run_dir = Path(session.params.run_dir)
    peak, peak_kind = peak_memory(session.accelerator)
    if peak is not None and info.get("peak_memory_gib") is not None:
        peak = max(peak, info["peak_memory_gib"])
    n_skipped = counters["non_finite_loss_steps"] + counters["non_finite_grad_steps"] + counters["overflow_steps"]
    skipped_pairs = dict(session.data.skipped)
    if counters["missing_image_samples"]:
        skipped_pairs[MISSING_DRAWN] = counters["missing_image_samples"]
    result = TrainResult(
        adapter_dir=str(run_dir / "adapter"), steps=step, total_steps=session.total_steps,
        final_train_loss=last_loss, final_val_loss=last_val.get("val_loss"),
        final_val_cider=last_val.get("val_CIDEr"), seconds=seconds, peak_memory_gib=peak,
        peak_memory_kind=peak_kind, trainable_params=session.trainable, non_finite_steps_skipped=n_skipped,
        resumed_from_step=start_step, losses=losses, skipped_pairs=skipped_pairs)
    if session.main:
        export_adapter(session, {"steps": step, "seconds": seconds, "final_train_loss": last_loss,
                                 "non_finite_steps_skipped": n_skipped})
        if session.params.train.merge_adapter:
            result.merged_dir = str(merge_adapter(session.params, run_dir / "adapter", run_dir / "merged"))
        atomic_write_json(run_dir / "train_result.json", result.to_dict())
    session.accelerator.wait_for_everyone()
    return result
