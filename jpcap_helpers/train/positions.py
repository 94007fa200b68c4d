"""Rotary (M-RoPE) positions of a training batch, computed on the CPU where the collator builds it.

The Qwen-VL models compute these 3-D positions inside their forward (``get_rope_index``: a Python loop
over the rows that reads GPU tensors back to the host while the GPU waits — 7 ms per step at
micro-batch 8 and 55 ms at 96 on an H200, run POS-1 in benchmarks/RESULTS.md). The collators compute
the same positions from the batch's CPU tensors, in the loader's worker processes, and hand them to
the model as ``position_ids``. Images only (videos are not captioned here).
"""
from __future__ import annotations

from typing import Any, Optional

__all__ = ["rope_positions", "packed_positions"]


def rope_positions(input_ids: Any, mm_token_type_ids: Any, image_grid_thw: Any, merge_size: int,
                   attention_mask: Optional[Any] = None) -> Any:
    """``[3, batch, L]`` positions as the Qwen2-VL / Qwen2.5-VL / Qwen3-VL ``get_rope_index`` gives them
    for image rows: over each row's attended tokens, a text token takes the next position in all three
    dimensions; an image (the next grid of ``image_grid_thw``, in row order) takes its merged grid's
    (frame, row, column) indices offset by the position after the text before it, and the text after
    it continues ``max(rows, columns)`` further. Unattended tokens (padding) get 0."""
    import numpy as np
    import torch

    batch, length = input_ids.shape
    types = mm_token_type_ids.cpu().numpy()
    live = (attention_mask.cpu().numpy() != 0) if attention_mask is not None else np.ones((batch, length), bool)
    grids = iter(image_grid_thw.tolist())
    out = np.zeros((3, batch, length), dtype=np.int64)
    for row in range(batch):
        cols = np.flatnonzero(live[row])
        kinds = types[row, cols]
        edges = np.flatnonzero(np.diff(kinds)) + 1
        pos, cur = np.empty((3, len(cols)), dtype=np.int64), 0
        for start, end in zip(np.r_[0, edges], np.r_[edges, len(cols)]):
            if start == end:
                continue
            if kinds[start] == 0:
                pos[:, start:end] = np.arange(cur, cur + end - start)
                cur += end - start
                continue
            if kinds[start] != 1:
                raise ValueError(f"row {row}: token type {kinds[start]} (video) — training batches hold images only")
            frames, rows, columns = next(grids)
            h, w = rows // merge_size, columns // merge_size
            if end - start != frames * h * w:
                raise ValueError(f"row {row}: {end - start} image tokens for a {frames}×{rows}×{columns} patch "
                                 f"grid ({frames * h * w} after merging {merge_size}×{merge_size})")
            grid = np.meshgrid(np.arange(frames), np.arange(h), np.arange(w), indexing="ij")
            pos[:, start:end] = np.stack([g.ravel() for g in grid]) + cur
            cur += max(rows, columns) // merge_size
        out[:, row, cols] = pos
    return torch.from_numpy(out).to(input_ids.dtype)


def packed_positions(prefix_positions: Any, segment_ids: Any, caption_pos: Any) -> Any:
    """Packed rows (:mod:`.packing`): the prefix keeps its own positions; each caption's text positions
    continue from the prefix's last position, as in its unpacked row."""
    import torch

    last = (segment_ids == 0).long().sum(1, keepdim=True) - 1   # the prefix starts each row
    start = prefix_positions[0].gather(1, last) + 1              # text positions: equal in all 3 dims
    caption = (start + caption_pos).unsqueeze(0).expand_as(prefix_positions)
    return torch.where((segment_ids > 0).unsqueeze(0), caption, prefix_positions)
