"""The caption engine's levers, passed explicitly (defaults: the measured fastest setting,
benchmarks/RESULTS.md). Benchmarks switch one off at a time; tests pick what they compare."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

__all__ = ["EngineOptions"]


@dataclass(frozen=True)
class EngineOptions:
    """Levers of :func:`caption_records` (none changes a caption beyond floating-point rounding).

    * ``pipeline`` — prepare the next batch (and write the last one's rows) while the GPU works on the
      current one's prefill; off: one after the other.
    * ``preprocess_on_gpu`` — the fast decoder's images are resized and normalised on the GPU (CPU
      preprocessing of 640×480 images costs ≈6.6 ms per image, more than the GPU needs to caption it).
    * ``compile_prefill`` — ``torch.compile`` the decoder's prefill layer function; None: where
      ``load_model`` compiled the vision tower (``model.compile`` on a measured family and GPU), for a
      plain model (adapter merged, not 4-bit).
    * ``compile_step`` — compile the decoding step's layer functions too, where the prefill's is
      compiled (decoding 256 captions: 105 instead of 132 ms of GPU time; longer captions gain more).
    * ``loader_threads`` — threads that read and decode the JPEGs ahead of the GPU; 0: one fewer than
      the CPU cores, at most 8.
    * ``reuse_decoder`` — keep the fast decoder (its KV buffers and captured CUDA graphs) on the model
      for the next call with the same settings and the same weights: every capture synchronises the GPU
      and empties PyTorch's device and pinned-host caches, so a new decoder per call (per split) paid
      that inside its first batches. Off where the buffers must not outlive the call (validation
      during training).
    """
    pipeline: bool = True
    preprocess_on_gpu: bool = True
    compile_prefill: Optional[bool] = None
    compile_step: bool = True
    loader_threads: int = 0
    reuse_decoder: bool = True

    def n_loader_threads(self) -> int:
        """The loader threads a run uses (``loader_threads``, or the default where 0)."""
        return self.loader_threads if self.loader_threads > 0 else max(1, min(8, (os.cpu_count() or 2) - 1))
