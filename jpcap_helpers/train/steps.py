"""One optimizer step, in the pieces the loop (and the plan's probe) calls: count the step's target
tokens, forward + backward over its micro-batches, clip and step; plus the inf/NaN guard."""
from __future__ import annotations

import contextlib
import math
from typing import Any, Optional

from .errors import TrainError
from .packing import target_count

__all__ = ["MAX_CONSECUTIVE_NONFINITE", "count_step", "forward_backward", "clip_and_step", "guard_non_finite"]

# Abort after this many optimizer steps in a row whose loss (or, without a GradScaler, gradient)
# was inf/NaN; single bad steps are skipped and counted.
MAX_CONSECUTIVE_NONFINITE = 20
SKIP_COUNTERS = {"non-finite loss": "non_finite_loss_steps", "non-finite gradient": "non_finite_grad_steps"}
NON_FINITE = tuple(SKIP_COUNTERS)


def count_step(session: Any, micro_batches: list[dict], missing: int = 0) -> tuple[float, int]:
    """(target tokens of the whole step, samples skipped for a missing image) over every process."""
    import torch

    local = sum(target_count(b) for b in micro_batches)
    if session.world == 1:   # no round trip through the device
        return max(float(local), 1.0), int(missing)
    counts = torch.tensor([float(local), float(missing)], device=session.accelerator.device)
    counts = session.accelerator.reduce(counts, "sum")
    return max(float(counts[0]), 1.0), int(counts[1])


def forward_backward(session: Any, micro_batches: list[dict], n_tokens: float) -> tuple[Any, bool]:
    """Backward over the step's micro-batches, each scaled so the step's gradient is the mean over all
    its ``n_tokens``; returns (the summed loss over every process, whether every loss of every process
    was finite). A non-finite loss still gets its backward (masked to 0; DDP needs one per forward) and
    the step is then skipped; the losses are checked once, after the last backward (one all-reduce of
    both numbers under DDP), so the host does not wait for each forward before it queues the backward."""
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
    return total, float(n_bad) == 0


def clip_and_step(session: Any, finite: bool) -> tuple[Optional[float], Optional[str]]:
    """Clip gradients and step the optimizer unless the step must be skipped; zero the gradients.
    Returns (gradient norm, why the step was skipped or None)."""
    acc, t = session.accelerator, session.params.train
    grad_norm, skipped = None, None
    if not finite:
        skipped = "non-finite loss"
    else:
        gn = acc.clip_grad_norm_(session.trainable_params, t.max_grad_norm if t.max_grad_norm > 0 else float("inf"))
        grad_norm = float(gn) if gn is not None else None
        if acc.scaler is None and grad_norm is not None and not math.isfinite(grad_norm):
            skipped = "non-finite gradient"
        else:
            session.optimizer.step()
            if acc.optimizer_step_was_skipped:
                skipped = "fp16 overflow (GradScaler lowered the scale)"
    session.optimizer.zero_grad(set_to_none=True)
    return grad_norm, skipped


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
