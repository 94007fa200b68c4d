"""Engine warm-up (``generation.warmup``): before the timed run, one small batch of blank images per
distinct (visual grid, batch-size bucket) the run's batches hold, through the same decoder, so that
``torch.compile`` and CUDA-graph capture happen up front instead of inside the first batches.

The fast decoder (:mod:`.decode`) captures its decoding step once per batch-size bucket (a power of two,
capped at the batch size) into buffers sized for the longest prompt seen; the compiled vision blocks
and prefill specialise on their first shapes and recompile once for dynamic shapes. So the warm-up
runs the longest prompt first (the buffers are then sized once and no graph is captured twice), and
for each (grid, bucket) the smallest batch that falls into that bucket. The images are blank and
their rows are thrown away; the decoder's state they leave (buffers, graphs, compiled code) holds
no data of theirs that a later batch reads, so the captions do not change (tested).
HF ``generate`` batches are not warmed (nothing is captured there): 0 seconds.
"""
from __future__ import annotations

import time
from typing import Any, Sequence

from . import decode
from .generation import generate_batch, prepare_inputs

__all__ = ["bucket_floor", "warmup_shapes", "warm_up"]

BLANK_LEVEL = 128   # grey: the blank images' pixel value


def bucket_floor(bucket: int, max_batch: int) -> int:
    """The smallest batch size that the decoder puts into ``bucket`` (its CUDA graph's batch size)."""
    return next(n for n in range(1, bucket + 1) if decode._bucket(n, max_batch) == bucket)


def warmup_shapes(batches: Sequence[Sequence[Any]], max_batch: int) -> list[tuple[tuple, int]]:
    """``(grid key, batch size)`` to warm: one per distinct (grid, batch-size bucket) of ``batches``
    (items with a ``key`` of ``(tokens, height, width)``), longest prompt first, then largest bucket."""
    seen: set[tuple[tuple, int]] = set()
    for batch in batches:
        if batch and len(batch[0].key) == 3:
            seen.add((tuple(batch[0].key), decode._bucket(len(batch), max_batch)))
    ordered = sorted(seen, key=lambda kb: (-kb[0][0], kb[0], -kb[1]))
    return [(key, bucket_floor(bucket, max_batch)) for key, bucket in ordered]


def _blank_images(n: int, height: int, width: int, as_tensor: bool) -> list:
    if as_tensor:
        import torch

        return [torch.full((3, height, width), BLANK_LEVEL, dtype=torch.uint8) for _ in range(n)]
    from PIL import Image

    return [Image.new("RGB", (width, height), (BLANK_LEVEL,) * 3) for _ in range(n)]


def warm_up(captioner: Any, batches: Sequence[Sequence[Any]]) -> tuple[float, int]:
    """Run the warm-up batches through ``captioner`` (a :class:`.pipeline.BatchCaptioner` whose decoder
    is the fast one; otherwise nothing runs). Returns (seconds, number of warm-up batches)."""
    decoder = captioner.decoder
    if decoder.fast is None:
        return 0.0, 0
    shapes = warmup_shapes(batches, decoder.fast.max_batch)
    start = time.perf_counter()
    for (_, height, width), n in shapes:
        images = _blank_images(n, height, width, as_tensor=captioner.device is not None)
        inputs = prepare_inputs(captioner.processor, [captioner.prompt] * n, images, device=captioner.device)
        generate_batch(captioner.processor, inputs, decoder)   # its texts are thrown away
    return time.perf_counter() - start, len(shapes)
