"""The run plan: time a few real steps (the probe), measure peak memory, estimate the run's duration and
warn, with params that would fit, when it would not fit a Colab session. The probe leaves the run as
it found it (weights, optimizer, scaler and RNG restored).

The probe first warms up — micro-batches until their time is stable (``torch.compile`` and CUDA-graph
warm-up make the first ones many times slower), bounded by :data:`PROBE_MAX_WARMUP`, and one optimizer
step — and times only what follows. The ETA is the steady steps plus the warm-up's extra time once
(``probe_warmup_s``, reported apart)."""
from __future__ import annotations

import contextlib
import copy
import math
import time
from typing import Any, Iterator, Optional

import numpy as np

from ..data import load_image, resolve_image_path
from .batches import CaptionCollator
from .costs import T4_EFFECTIVE_TFLOPS, cost_estimate, model_flops_per_sample
from .lora import causal_lm
from .loss import caption_loss
from .rng import rng_state, set_rng_state
from .session import TrainSession, open_session, peak_memory, precision_name
from .shapes import micro_batch_lengths, run_shapes, sample_tokens
from .steps import count_step, forward_backward, zero_gradients
from .validation import validation_batches, validation_stance

__all__ = ["COLAB_SESSION_MAX_HOURS", "COLAB_FREE_T4_USABLE_HOURS", "PROBE_MICRO_BATCHES", "PROBE_MAX_WARMUP",
           "PROBE_STABLE_RATIO", "PROBE_MAX_SHAPES", "probe_slots", "cudagraphs_tip", "probe", "fit_check", "plan",
           "format_plan"]

# A free Colab session ends after at most ~12 h; a free T4 is often reclaimed much earlier, so plan
# for 3 usable hours (resume from the last checkpoint in the next session for longer runs).
COLAB_SESSION_MAX_HOURS = 12.0
COLAB_FREE_T4_USABLE_HOURS = 3.0
PROBE_MICRO_BATCHES = 3          # timed micro-batches, after the warm-up
PROBE_DISTINCT_BATCHES = 3       # distinct micro-batches collated (warm-up meets each one's shapes)
PROBE_SCAN_MICRO_BATCHES = 50    # grouped by grid: epoch 0's first micro-batches searched for other grids
CUDAGRAPHS_TIP_MAX_MICRO = 16     # the plan suggests train.cudagraphs up to this micro-batch (measured gains: 8, 16)
PROBE_MAX_SHAPES = 8             # train.cudagraphs: padded lengths the warm-up meets at most (the rest: costed)
PROBE_MAX_WARMUP = 10            # warm-up micro-batches at most
PROBE_STABLE_RATIO = 1.3         # warm once two consecutive micro-batches differ by less than this factor
EVAL_PROBE_TOKENS = 4            # tokens of the timed generate that estimates validation time


def _sync(session: TrainSession) -> None:
    import torch
    if session.accelerator.device.type == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def training_state_restored(session: TrainSession) -> Iterator[dict]:
    """Snapshot trainable weights, optimizer, GradScaler and RNG; put them back on exit."""
    import torch

    acc = session.accelerator
    saved = {"rng": rng_state(), "weights": [p.detach().clone() for p in session.trainable_params],
             "optimizer": copy.deepcopy(session.optimizer.state_dict()),
             "scaler": copy.deepcopy(acc.scaler.state_dict()) if acc.scaler is not None else None}
    try:
        yield saved
    finally:
        with torch.no_grad():
            for p, w in zip(session.trainable_params, saved["weights"]):
                p.copy_(w)
        session.optimizer.load_state_dict(saved["optimizer"])
        if saved["scaler"] is not None:
            acc.scaler.load_state_dict(saved["scaler"])
        set_rng_state(saved["rng"])


def probe_slots(n_samples: int, micro_batch: int, grids: Optional[np.ndarray] = None,
                lengths: Optional[np.ndarray] = None, k: int = PROBE_DISTINCT_BATCHES,
                scan: int = PROBE_SCAN_MICRO_BATCHES, max_lengths: Optional[int] = None) -> list[int]:
    """Which of epoch 0's micro-batches (by position) the probe collates: the first ``k``; or, with the
    samples' visual ``grids`` in epoch order (``train.group_by_grid``, whose micro-batches mostly hold one
    grid), first those of the first ``scan`` that bring a grid not met yet, then the first others — so the
    warm-up compiles for more than one shape, as the run will, and its timing is not one grid's. With each
    micro-batch's padded ``lengths`` (``train.cudagraphs``: each new length is one more compiled, recorded
    shape), first those that bring a length not met yet, up to ``max_lengths`` (:data:`PROBE_MAX_SHAPES`) of
    them: the warm-up then pays the shapes the run would otherwise pay mid-run, and measures what one costs."""
    n = max(1, math.ceil(n_samples / micro_batch))
    max_lengths = PROBE_MAX_SHAPES if max_lengths is None else max_lengths
    chosen: list[int] = []
    if lengths is not None:
        met: set = set()
        for j, length in enumerate(lengths[:n].tolist()):
            if length not in met and len(chosen) < max_lengths:
                chosen.append(j)
                met.add(length)
    if grids is not None:
        seen = {tuple(g) for j in chosen for g in grids[j * micro_batch:(j + 1) * micro_batch]}
        for j in range(min(n, scan)):
            new = {tuple(g) for g in grids[j * micro_batch:(j + 1) * micro_batch]} - seen
            if new and j not in chosen and len(chosen) < k:
                chosen.append(j)
                seen |= new
    picked = chosen + [j for j in range(n) if j not in chosen]
    return [picked[j % len(picked)] for j in range(max(k, len(chosen)))]


def _collate_probe_batches(session: TrainSession) -> tuple[list[dict], list[float], list[list[int]]]:
    """The probe's micro-batches of epoch 0 (:func:`probe_slots`), the seconds each took to load and
    collate, and the samples of each."""
    m = session.params.train.micro_batch_size
    order = session.sample_order(0)
    grids = session.data.epoch_grids(0)[order] if session.data.grids is not None else None
    dataset, collator = session.data.epoch_dataset(0), session.data.train_collator

    def collate(slot: int) -> tuple[dict, float, list[int]]:
        idx = [int(i) for i in order[(slot * m) % len(order):][:m]]
        t0 = time.perf_counter()
        batch = collator([dataset[i] for i in idx])
        return batch, time.perf_counter() - t0, idx

    first = collate(0)
    lengths = None
    if _cudagraphs_used(session):   # the padded length of each micro-batch, where it can be counted
        tokens = sample_tokens(session, first[0], first[2])
        if tokens is not None:
            lengths = micro_batch_lengths(tokens, order, m, session.data.collator.pad_multiple)
    collated = [first if slot == 0 else collate(slot) for slot in probe_slots(len(order), m, grids, lengths)]
    batches, seconds, samples = (list(x) for x in zip(*collated))
    return batches, seconds, samples


def _time_micro_batch(session: TrainSession, batch: dict) -> float:
    """Seconds of forward + backward of one micro-batch (as its own step's only micro-batch); under
    several processes the slowest process's, so that every process takes the same warm-up decisions
    (each micro-batch synchronises gradients: all must run the same number)."""
    import torch

    batch = session.to_device(batch)
    t0 = time.perf_counter()
    n_tokens, _ = count_step(session, [batch])
    forward_backward(session, [batch], n_tokens)
    _sync(session)
    seconds = time.perf_counter() - t0
    if session.world > 1:
        seconds = float(session.accelerator.reduce(torch.tensor([seconds], device=session.accelerator.device),
                                                   "max")[0])
    return seconds


def _warm_up(session: TrainSession, batches: list[dict]) -> list[float]:
    """Micro-batches (cycling through ``batches``) until each batch has run once and two consecutive
    ones took times within :data:`PROBE_STABLE_RATIO` of each other, at most :data:`PROBE_MAX_WARMUP`;
    their seconds."""
    seconds: list[float] = []
    while len(seconds) < PROBE_MAX_WARMUP:
        seconds.append(_time_micro_batch(session, batches[len(seconds) % len(batches)]))
        if len(seconds) >= max(2, len(batches)):
            a, b = seconds[-2:]
            if max(a, b) <= PROBE_STABLE_RATIO * max(min(a, b), 1e-9):
                break
    return seconds


def _time_micro_batches(session: TrainSession, batches: list[dict]) -> list[float]:
    """Seconds of forward + backward of :data:`PROBE_MICRO_BATCHES` micro-batches (cycling ``batches``)."""
    return [_time_micro_batch(session, batches[k % len(batches)]) for k in range(PROBE_MICRO_BATCHES)]


def _time_optimizer_step(session: TrainSession) -> tuple[float, bool]:
    """(seconds of clip + AdamW step, whether the GradScaler skipped it)."""
    acc, t = session.accelerator, session.params.train
    t0 = time.perf_counter()
    acc.clip_grad_norm_(session.trainable_params, t.max_grad_norm if t.max_grad_norm > 0 else float("inf"))
    session.optimizer.step()
    skipped = acc.optimizer_step_was_skipped   # fp16: the scaler's first scale may overflow
    zero_gradients(session)
    _sync(session)
    return time.perf_counter() - t0, skipped


def estimate_eval_seconds(session: TrainSession, micro_s: float) -> float:
    """Validation time: its loss forwards + a short timed generate, both as validation runs them
    (:func:`validation_stance`). A loss forward is ≈ a third of a training micro-batch (forward + backward);
    with ``train.cudagraphs`` validation runs eagerly beside graphed steps, so one is timed instead."""
    import torch

    t, g = session.params.train, session.params.generation
    records = session.data.val_records
    n_pairs = sum(len(r["captions"]) for r in records)
    n = min(len(records), g.batch_size, 8)
    samples = [{"image": load_image(resolve_image_path(session.params.images_dir, r["file_name"]))}
               for r in records[:n]]
    batch = session.to_device(CaptionCollator(session.processor, session.prompt, "left", prompt_only=True)(samples))
    model, rng = session.model, rng_state()
    model.eval()
    try:
        with torch.no_grad(), session.accelerator.autocast(), validation_stance(model):
            forward_s = _timed_loss_forward(session) if _cudagraphs_used(session) and n_pairs else micro_s / 3
            t0 = time.perf_counter()
            model.generate(**batch, max_new_tokens=EVAL_PROBE_TOKENS, min_new_tokens=EVAL_PROBE_TOKENS,
                           do_sample=False)
            _sync(session)
            gen_s = time.perf_counter() - t0
    finally:
        model.train()
        set_rng_state(rng)
    per_batch = gen_s / EVAL_PROBE_TOKENS * g.max_new_tokens   # a batch of up to g.batch_size images
    return math.ceil(n_pairs / t.micro_batch_size) * forward_s + math.ceil(len(records) / max(n, 1)) * per_batch


def _timed_loss_forward(session: TrainSession) -> float:
    """Seconds of one validation micro-batch's loss forward (its second call: the first warms up)."""
    batch = next(validation_batches(session))
    caption_loss(session.model, batch)
    _sync(session)
    t0 = time.perf_counter()
    caption_loss(session.model, batch)
    _sync(session)
    return time.perf_counter() - t0


def _count_evals(total_steps: int, start_step: int, every: int) -> int:
    """Validations between ``start_step`` and ``total_steps``: every ``every`` steps and at the last."""
    n = total_steps // every - start_step // every
    return n + int(total_steps % every != 0 and total_steps > start_step)


def probe(session: TrainSession, session_hours: Optional[float] = None, start_step: int = 0) -> dict:
    """Time a few real micro-batches (forward + backward) and one optimizer step, measure peak memory,
    estimate the run's duration; the run's state is restored afterwards."""
    import torch

    acc, t = session.accelerator, session.params.train
    with training_state_restored(session) as saved:
        if acc.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(acc.device)
        batches, collate_times, probe_samples = _collate_probe_batches(session)
        warm_times = _warm_up(session, batches)
        warm_opt, _ = _time_optimizer_step(session)          # the first step allocates AdamW's state
        step_times = _time_micro_batches(session, batches)
        opt_time, step_skipped = _time_optimizer_step(session)
        peak, peak_kind = peak_memory(acc)
        if step_skipped and peak is not None and not saved["optimizer"]["state"]:
            peak += 2 * 4 * session.trainable / 2**30       # AdamW's two fp32 moments, never allocated
            peak_kind += " + AdamW state (computed: the probe step was skipped by the GradScaler)"

    micro_s = float(np.median(step_times))
    collate_s = float(np.median(collate_times))
    warmup_s = float(sum(warm_times) + warm_opt)
    # paid once: what the warm-up took beyond the same work at the steady speed
    warmup_extra_s = max(0.0, warmup_s - len(warm_times) * micro_s - opt_time)
    if session.num_workers == 0:      # collation runs in line with compute
        step_s = session.accum * (micro_s + collate_s) + opt_time
    else:                             # loader workers collate while the GPU computes
        step_s = session.accum * max(micro_s, collate_s / session.num_workers) + opt_time
    remaining = max(0, session.total_steps - start_step)
    eval_s = estimate_eval_seconds(session, micro_s) if session.eval_enabled else 0.0
    n_evals = _count_evals(session.total_steps, start_step, t.eval_every) if session.eval_enabled else 0
    shapes = _new_shapes(session, batches, probe_samples, warm_times, micro_s, start_step) if remaining else {}
    eta_s = (remaining * step_s + n_evals * eval_s + (warmup_extra_s if remaining else 0.0)
             + (shapes.get("new_shapes_s") or 0.0))
    info = {
        "device": str(acc.device), "processes": session.world, "precision": precision_name(session.dtype),
        "mixed_precision": acc.mixed_precision, "method": session.params.train_method,
        "load_in_4bit": session.load_in_4bit,
        "trainable_params": session.trainable, "total_params": session.total,
        "trainable_share": session.trainable / max(session.total, 1),
        "n_train_pairs": len(session.data.pairs), "n_train_images": session.data.n_images,
        "skipped_pairs": session.data.skipped,
        "micro_batch_size": t.micro_batch_size, "accumulation_steps": session.accum,
        "effective_batch_size": t.effective_batch_size, "steps_per_epoch": session.steps_per_epoch,
        "pack_captions": t.pack_captions, "captions_per_sample": _captions_per_sample(session),
        "total_steps": session.total_steps, "schedule_steps": session.schedule_steps, "start_step": start_step,
        "probe_micro_batch_s": micro_s, "probe_collate_s": collate_s, "probe_optimizer_step_s": opt_time,
        "probe_warmup_s": warmup_s, "probe_warmup_micro_batches": len(warm_times),
        "probe_warmup_extra_s": warmup_extra_s, "steady_s": remaining * step_s,
        "step_s": step_s, "samples_per_s": t.effective_batch_size / step_s,
        "eval_s_each": eval_s, "n_evals": n_evals,
        "peak_memory_gib": peak, "peak_memory_kind": peak_kind,
        "eta_s": eta_s, "eta_h": eta_s / 3600, "cudagraphs_requested": t.cudagraphs,
        "cudagraphs": _cudagraphs_used(session), "cudagraphs_tip": cudagraphs_tip(session), **shapes,
    }
    info["cost_model_t4"] = _t4_cost(session, batches, remaining * t.effective_batch_size)
    info.update(fit_check(session.params, info, session_hours, session.data.n_images))
    return info


def _cudagraphs_used(session: TrainSession) -> bool:
    return bool(getattr(causal_lm(session.model), "jpcap_cudagraphs", False))


def _compiled(session: TrainSession) -> bool:
    return bool(getattr(causal_lm(session.model), "jpcap_compiled", False))


def cudagraphs_tip(session: TrainSession) -> Optional[str]:
    """For a compiled run (one GPU or DDP) at a small micro-batch without ``train.cudagraphs``: the overrides
    that would turn it on and what it gave (docs/training.md, "CUDA graphs for the step"); None otherwise."""
    t = session.params.train
    if t.cudagraphs or t.micro_batch_size > CUDAGRAPHS_TIP_MAX_MICRO or not _compiled(session):
        return None
    overrides = ["train.cudagraphs=true"] + (["train.group_by_grid=true"] if not t.group_by_grid else [])
    return (f"tip: at micro-batch {t.micro_batch_size} the step is launch-bound; {' '.join(overrides)} replays the "
            "language layers as CUDA graphs — 1.5–2.1× the samples/s at micro-batch 8, 1.2–1.4× the captions/s "
            "packed at 16 (H200, one GPU and 2-GPU DDP, same losses; docs/training.md \"CUDA graphs for the step\")")


def _new_shapes(session: TrainSession, batches: list[dict], samples: list[list[int]], warm_times: list[float],
                micro_s: float, start_step: int) -> dict:
    """``train.cudagraphs`` (where used): how many batch shapes the run meets beyond the probe's, and what
    each costs once (compilation + CUDA-graph recording) — the warm-up's time beyond the steady pace after its
    first micro-batch, per further shape it met. Either is None where it cannot be known (:func:`sample_tokens`;
    a probe of one shape); empty without CUDA graphs (the layers are dynamic: no compilation per shape)."""
    if not _cudagraphs_used(session):
        return {}
    seen = {tuple(b["input_ids"].shape) for b in batches}
    tokens = sample_tokens(session, batches[0], samples[0])
    run = None if tokens is None else run_shapes(session, tokens, start_step, session.data.collator.pad_multiple)
    new = None if run is None else len(run - seen)
    each = sum(max(0.0, s - micro_s) for s in warm_times[1:]) / (len(seen) - 1) if len(seen) > 1 else None
    cost = 0.0 if new == 0 else (new * each if new is not None and each is not None else None)
    return {"batch_shapes_probe": len(seen), "batch_shapes_run": None if run is None else len(run | seen),
            "new_batch_shapes": new, "new_shape_s_each": each, "new_shapes_s": cost}


def _captions_per_sample(session: TrainSession) -> float:
    """1 without packing; with it the mean number of captions a packed sample holds."""
    return len(session.data.pairs) / max(session.data.n_samples, 1)


def _t4_cost(session: TrainSession, batches: list[dict], n_samples: int) -> dict:
    """The cost model's estimate for this run on a T4, from the probe batches' real lengths; per caption
    (a packed row's FLOPs shared by its captions: the image and prefix count once per image)."""
    seq = float(np.mean([b["input_ids"].shape[1] for b in batches]))
    patches = float(np.mean([float(b["image_grid_thw"].prod(-1).float().mean()) for b in batches]))
    per_caption = _captions_per_sample(session)
    return cost_estimate(model_flops_per_sample(session.model, seq, patches) / per_caption,
                         round(n_samples * per_caption))


def _default_session_hours() -> Optional[float]:
    """3 h on a (free) T4, 12 h elsewhere in Colab, None outside Colab."""
    try:
        from ..colab import gpu_info, in_colab
        if "T4" in (gpu_info().get("gpu") or ""):
            return COLAB_FREE_T4_USABLE_HOURS
        if in_colab():
            return COLAB_SESSION_MAX_HOURS
    except Exception:
        pass
    return None


def fit_check(params: Any, info: dict, session_hours: Optional[float], n_images: int) -> dict:
    """Warn when the ETA exceeds a Colab session; suggest params that would fit."""
    if session_hours is None:
        session_hours = _default_session_hours()
    out: dict[str, Any] = {"session_hours": session_hours, "fits_session": None, "warning": None,
                           "suggestions": {}}
    if session_hours is None:
        return out
    budget, eta = session_hours * 3600, info["eta_s"]
    out["fits_session"] = eta <= budget
    if eta <= budget:
        return out
    f = 0.9 * budget / eta
    t, m = params.train, params.model
    sugg: dict[str, Any] = {}
    if not t.max_steps:
        sugg["data.train_subset"] = max(1, int(n_images * f))
        sugg["train.epochs"] = round(max(0.01, t.epochs * f), 2)
    sugg["train.max_steps"] = max(1, int(info["total_steps"] * f))
    px = 28 * 28   # one merged image token
    new_max = max(m.min_pixels, int(m.max_pixels * f) // px * px)
    if f >= 0.5 and new_max < m.max_pixels:   # rough (text tokens and fixed costs remain): only small cuts
        sugg["model.max_pixels"] = new_max
    out["suggestions"] = sugg
    alts = ", ".join(f"{k}: {v}" for k, v in sugg.items())
    out["warning"] = (f"⚠ this run needs about {eta / 3600:.1f} h on this hardware, more than the "
                      f"{session_hours:g} h a {'free T4 ' if session_hours == COLAB_FREE_T4_USABLE_HOURS else ''}"
                      f"Colab session can be counted on. Any ONE of these would fit (max_pixels only roughly: time "
                      f"is not exactly proportional to image tokens): {alts}. Or keep the params and resume in the "
                      f"next session: checkpoints every train.save_every={t.save_every} steps.")
    return out


def plan(params: Any, *, session_hours: Optional[float] = None) -> dict:
    """Load the model and data as :func:`~jpcap_helpers.train.train` would and run timed probe steps:
    trainable parameter count, measured peak memory, ETA for the whole run on this hardware and, when
    it would not fit a Colab session (``session_hours``; default: 3 h on a T4, 12 h elsewhere in Colab,
    no limit outside Colab), a warning with params that would fit. Changes nothing on disk."""
    session = open_session(params)
    try:
        return probe(session, session_hours)
    finally:
        session.close()


def _format_shapes(info: dict) -> str:
    n = info.get("batch_shapes_probe")
    line = (f"CUDA graphs: language layers replayed per batch shape · {n} shape{'' if n == 1 else 's'} warmed by "
            "the probe")
    if info.get("batch_shapes_run") is None:
        return line + "; the run's shapes could not be counted (packed captions or ungrouped grids): each new one " \
                      "pays a compilation once, not in the ETA"
    line += f", {info['batch_shapes_run']} in the run"
    if info.get("new_batch_shapes") and info.get("new_shapes_s") is None:
        line += ("; each new one pays a compilation once, not in the ETA (the probe met one shape: its cost "
                 "was not measured)")
    return line


def format_plan(info: dict) -> str:
    """A few human lines for a plan dict."""
    mem = "n/a" if info["peak_memory_gib"] is None else f"{info['peak_memory_gib']:.2f} GiB ({info['peak_memory_kind']})"
    lines = [
        f"train: {info['method']} on {info['device']} ×{info['processes']} · {info['precision']} "
        f"(mixed precision: {info['mixed_precision']}) · 4-bit: {info['load_in_4bit']}",
        f"trainable params: {info['trainable_params']:,} of {info['total_params']:,} "
        f"({100 * info['trainable_share']:.2f}%)",
        f"data: {info['n_train_pairs']:,} pairs / {info['n_train_images']:,} images · "
        f"{info['steps_per_epoch']} steps/epoch · {info['total_steps']} steps of {info['effective_batch_size']} "
        f"(micro-batch {info['micro_batch_size']} × {info['accumulation_steps']} accumulation)"
        + (f" · packed: a sample is an image with ≈ {info['captions_per_sample']:.1f} captions"
           if info.get("pack_captions") else ""),
        f"probe: {info['step_s']:.3f} s/step ({info['samples_per_s']:.1f} samples/s), timed after "
        f"{info['probe_warmup_micro_batches']} warm-up micro-batches + 1 optimizer step "
        f"({info['probe_warmup_s']:.1f} s: compilation, CUDA-graph and allocator warm-up) · peak memory {mem}",
        f"ETA: {info['eta_h']:.2f} h for steps {info['start_step']}→{info['total_steps']} = steady steps "
        f"{info['steady_s'] / 3600:.2f} h + warm-up once {info['probe_warmup_extra_s']:.0f} s"
        + (f" + {info['n_evals']} validations of ~{info['eval_s_each']:.0f} s" if info['n_evals'] else "")
        + (f" + {info['new_batch_shapes']} new batch shapes × {info['new_shape_s_each']:.1f} s"
           if info.get("new_batch_shapes") and info.get("new_shapes_s") is not None else ""),
    ]
    if info.get("cudagraphs"):
        lines.append(_format_shapes(info))
    elif info.get("cudagraphs_tip"):
        lines.append(info["cudagraphs_tip"])
    elif info.get("cudagraphs_requested"):
        lines.append("train.cudagraphs: not used here (the blocks are compiled only on a CUDA GPU of compute "
                     "capability ≥ 8.0 with model.compile): the step runs as without it")
    cost = info.get("cost_model_t4")
    if cost:
        lines.append(f"cost model: {cost['tflop_per_sample']:.2f} TFLOP per caption → on a free T4 "
                     f"(≈ {T4_EFFECTIVE_TFLOPS:g} TFLOP/s effective, estimated) ≈ {cost['samples_per_s']:.1f} "
                     f"captions/s, ≈ {cost['hours']:.2f} h of training for this run")
    if info.get("schedule_steps", info["total_steps"]) != info["total_steps"]:
        lines.append(f"resumed run shortened: stops at step {info['total_steps']} of the "
                     f"{info['schedule_steps']}-step learning-rate schedule it started with")
    if info.get("skipped_pairs"):
        lines.append(f"skipped: {info['skipped_pairs']}")
    if info.get("warning"):
        lines.append(info["warning"])
    return "\n".join(lines)
