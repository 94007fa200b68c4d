"""The batch shapes a run meets, for ``train.cudagraphs``: the compiled language layers are specialised, so
every new micro-batch shape (rows × padded tokens) costs one compilation and CUDA-graph recording. The plan's
probe warms the padded lengths epoch 0 holds, and counts the shapes of the whole run beyond those it met
(docs/training.md, "CUDA graphs for the step").

A sample's tokens are its caption's tokens plus its image's (resized pixels ÷ (patch × merge)²) plus a constant
(system prompt, user prompt, chat template), the constant read off one collated batch."""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np

__all__ = ["sample_tokens", "micro_batch_lengths", "run_shapes"]


def sample_tokens(session: Any, batch: dict, indices: Sequence[int]) -> Optional[np.ndarray]:
    """Each training sample's row length before padding, calibrated on ``batch`` (collated from samples
    ``indices``); None where it cannot be counted this way: packed samples (several captions per row), no
    visual grids (``train.group_by_grid`` off), an image processor without patch and merge sizes, or a batch
    whose rows do not all fit one constant (e.g. a missing image's stand-in)."""
    data = session.data
    images = getattr(session.processor, "image_processor", None)
    side = getattr(images, "patch_size", 0) * getattr(images, "merge_size", 0)   # pixels per visual token side
    if data.packed is not None or data.grids is None or not side:
        return None
    tok = session.processor.tokenizer
    captions = tok([p["caption"] for p in data.pairs], add_special_tokens=False)["input_ids"]
    tokens = np.fromiter((len(c) for c in captions), dtype=np.int64, count=len(captions))
    tokens += data.grids[:, 0] * data.grids[:, 1] // side**2   # grids: resized (height, width) in pixels
    live = np.asarray(batch["attention_mask"].sum(dim=1).tolist(), dtype=np.int64)
    offsets = set((live - tokens[np.asarray(indices, dtype=np.int64)]).tolist())
    return tokens + offsets.pop() if len(offsets) == 1 else None


def micro_batch_lengths(tokens: np.ndarray, order: np.ndarray, micro: int, pad_multiple: int) -> np.ndarray:
    """The padded length of each whole micro-batch of samples ``order``: its longest row rounded up to
    ``pad_multiple``, as the collator pads."""
    n = len(order) // micro
    longest = tokens[np.asarray(order[:n * micro], dtype=np.int64)].reshape(n, micro).max(axis=1)
    return -(-longest // pad_multiple) * pad_multiple


def run_shapes(session: Any, tokens: np.ndarray, start_step: int, pad_multiple: int) -> set[tuple[int, int]]:
    """(rows, padded tokens) of every micro-batch of steps ``start_step``… of the run (one process): each
    micro-batch padded to its longest row, rounded up to ``pad_multiple``, as the collator pads."""
    t = session.params.train
    effective, micro, per_epoch = t.effective_batch_size, t.micro_batch_size, session.steps_per_epoch
    shapes: set[tuple[int, int]] = set()
    for epoch in range(start_step // per_epoch, math.ceil(session.total_steps / per_epoch)):
        first = max(0, start_step - epoch * per_epoch)
        last = min(per_epoch, session.total_steps - epoch * per_epoch)
        order = session.sample_order(epoch)[first * effective:last * effective]   # whole micro-batches
        shapes |= {(micro, int(n)) for n in np.unique(micro_batch_lengths(tokens, order, micro, pad_multiple))}
    return shapes
