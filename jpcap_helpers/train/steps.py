"""One optimizer step, in the pieces the loop (and the plan's probe) calls: count the step's target
tokens, forward + backward over its micro-batches, clip and step; plus the inf/NaN guard."""
from __future__ import annotations

import contextlib
import math
from typing import Any, Optional, Sequence

from .errors import TrainError
from .packing import target_count

__all__ = ["MAX_CONSECUTIVE_NONFINITE", "count_step", "forward_backward", "clip_and_step", "zero_gradients",
           "guard_non_finite"]

# Abort after this many optimizer steps in a row whose loss (or, without a GradScaler, gradient)
# was inf/NaN; single bad steps are skipped and counted.
MAX_CONSECUTIVE_NONFINITE = 20
SKIP_COUNTERS = {"non-finite loss": "non_finite_loss_steps", "non-finite gradient": "non_finite_grad_steps"}
NON_FINITE = tuple(SKIP_COUNTERS)


def count_step(session: Any, micro_batches: list[dict], missing: int = 0,
               local: Optional[int] = None) -> tuple[Any, Any]:
    """(target tokens of the whole step, samples skipped for a missing image) over every process: numbers
    on one process; under DDP 0-dim device tensors, all-reduced but not read here — the step reads them
    once, with its loss (:func:`clip_and_step`). ``local``: this process's target tokens, counted by the
    caller before the batches went to the device (else counted here, which may wait for the device)."""
    import torch

    local = sum(target_count(b) for b in micro_batches) if local is None else local
    if session.world == 1:   # no round trip through the device
        return max(float(local), 1.0), int(missing)
    device = session.accelerator.device
    # filled by kernels, not copied from the host: nothing waits for the previous step's work
    counts = torch.stack([torch.full((), float(local), device=device), torch.full((), float(missing), device=device)])
    counts = session.accelerator.reduce(counts, "sum")
    return counts[0].clamp_min(1.0), counts[1]


def forward_backward(session: Any, micro_batches: list[dict], n_tokens: Any) -> tuple[Any, Any]:
    """Backward over the step's micro-batches, each scaled so the step's gradient is the mean over all
    its ``n_tokens``; returns (the summed loss over every process, how many losses of every process
    were inf/NaN), both device tensors that this function does not read. A non-finite loss still gets
    its backward (masked to 0; DDP needs one per forward) and the step is then skipped
    (:func:`clip_and_step`); under DDP both numbers are reduced in one all-reduce."""
    import torch

    acc, world = session.accelerator, session.world
    total = torch.zeros((), device=acc.device)
    n_bad = torch.zeros((), device=acc.device)
    for j, batch in enumerate(micro_batches):
        sync = j == len(micro_batches) - 1   # DDP: gradients are averaged once per step
        with contextlib.nullcontext() if sync else acc.no_sync(session.loss_module):
            with acc.autocast():
                loss_sum, _ = session.loss_module(batch)
            finite = torch.isfinite(loss_sum.detach())
            n_bad = n_bad + (~finite).float()
            acc.backward(torch.where(finite, loss_sum, torch.zeros_like(loss_sum)) * (world / n_tokens))
            total = total + torch.where(finite, loss_sum.detach().float(), torch.zeros_like(total))
    if world > 1:
        n_bad, total = acc.reduce(torch.stack([n_bad, total]), "sum").unbind()
    return total, n_bad


def clip_and_step(session: Any, n_bad: Any, scalars: Sequence[Any] = ()) -> tuple[Optional[float], Optional[str], list[float]]:
    """Clip gradients and step the optimizer unless the step must be skipped — an inf/NaN loss on any
    process (``n_bad`` > 0) or, without a GradScaler, an inf/NaN gradient norm —; zero the gradients.
    The host reads the device once per step: ``n_bad``, the gradient norm and ``scalars`` (device tensors
    or numbers: the step's loss sum, token count …) in one copy. With a GradScaler (fp16) it reads twice:
    the loss check comes before the gradients are unscaled, which must be followed by an optimizer step.
    Returns (gradient norm, why the step was skipped or None, ``scalars`` as floats)."""
    acc, t = session.accelerator, session.params.train
    max_norm = t.max_grad_norm if t.max_grad_norm > 0 else float("inf")
    grad_norm, skipped = None, None
    if acc.scaler is not None:
        bad, *values = _read_once([n_bad, *scalars])
        if bad:
            skipped = "non-finite loss"
        else:
            gn = acc.clip_grad_norm_(session.trainable_params, max_norm)
            grad_norm = float(gn) if gn is not None else None
            session.optimizer.step()
            if acc.optimizer_step_was_skipped:
                skipped = "fp16 overflow (GradScaler lowered the scale)"
    else:
        gn = acc.clip_grad_norm_(session.trainable_params, max_norm)
        bad, norm, *values = _read_once([n_bad, float("nan") if gn is None else gn, *scalars])
        if bad:
            skipped = "non-finite loss"
        else:
            grad_norm = None if gn is None else norm
            if grad_norm is not None and not math.isfinite(grad_norm):
                skipped = "non-finite gradient"
            else:
                session.optimizer.step()
    zero_gradients(session)
    return grad_norm, skipped, values


def zero_gradients(session: Any) -> None:
    """Clear the trainable parameters' gradients for the next step (None: the next backward stores its
    gradient as is). With ``train.cudagraphs`` they stay allocated and are zeroed in place — allocated here
    before the first step — so that each backward adds its gradient into them: a gradient kept as is would
    be a CUDA graph's output, overwritten by the next micro-batch's replay before it is accumulated or
    stepped (the probe's warm-up, accumulation over micro-batches: runs CG-5/CG-6, pytorch#169545)."""
    import torch

    if not session.params.train.cudagraphs:
        session.optimizer.zero_grad(set_to_none=True)
        return
    for p in session.trainable_params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    session.optimizer.zero_grad(set_to_none=False)


def _read_once(values: Sequence[Any]) -> list[float]:
    """``values`` (device tensors of one element, or numbers) as floats, the tensors copied to the host in
    one transfer."""
    import torch

    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    if not tensors:
        return [float(v) for v in values]
    read = iter(torch.stack([v.detach().reshape(()).double() for v in tensors]).tolist())
    return [next(read) if isinstance(v, torch.Tensor) else float(v) for v in values]


def guard_non_finite(counters: dict, skipped: Optional[str], step: int, limit: int, checkpoints: Any) -> None:
    """Count a skipped step by kind; stop with a TrainError after ``limit`` non-finite steps in a row."""
    if skipped:
        counters[SKIP_COUNTERS.get(skipped, "overflow_steps")] += 1
    if skipped not in NON_FINITE:
        counters["consecutive_non_finite"] = 0
        return
    counters["consecutive_non_finite"] += 1
    if counters["consecutive_non_finite"] >= limit:
        raise TrainError(
            f"training stopped at step {step}: {counters['consecutive_non_finite']} optimizer steps in a row had "
            f"a non-finite (inf/NaN) {skipped.split()[-1]}. On a T4 this is usually fp16 overflow (Qwen is "
            "fp16-fragile): lower train.learning_rate, keep train.max_grad_norm at 1.0, or use a GPU with bf16; "
            f"the run resumes from its last checkpoint in {checkpoints}")
