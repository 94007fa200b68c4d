"""Compute precision from the hardware: bf16 only where the GPU runs it natively (compute capability
≥ 8.0: A100, L4, H100, ...), fp16 on older GPUs (a T4 is 7.5), fp32 on CPU.

``torch.cuda.is_bf16_supported()`` answers True on a T4 because it counts emulation (bf16 math
emulated in fp32: correct, but far slower than fp16), so it is never asked here: the decision comes
from ``torch.cuda.get_device_capability()``.
"""
from __future__ import annotations

from .registry import ModelError

__all__ = ["bf16_native", "choose_dtype"]

BF16_MIN_CAPABILITY = 8  # compute capability major version with native bf16 (Ampere)


def bf16_native() -> bool:
    """Whether this process's GPU computes in bf16 natively (False on CPU and on a T4)."""
    import torch

    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= BF16_MIN_CAPABILITY


def choose_dtype(precision: str = "auto"):
    """torch dtype for ``model.precision``: auto → bf16 where native, fp16 on older GPUs (e.g. a T4 —
    Qwen is fp16-fragile, so the trainer guards against inf/NaN), fp32 on CPU. An explicit choice the
    hardware cannot run is an error, not a silent fallback."""
    import torch

    cuda = torch.cuda.is_available()
    if precision == "auto":
        return torch.bfloat16 if bf16_native() else (torch.float16 if cuda else torch.float32)
    if precision == "bf16":
        if cuda and not bf16_native():
            major, minor = torch.cuda.get_device_capability()
            raise ModelError(f"model.precision: bf16 requested but this GPU (compute capability {major}.{minor}, "
                             f"e.g. a T4) has no native bf16: use fp16 or auto")
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if precision == "fp32":
        return torch.float32
    raise ModelError(f"model.precision: unknown value {precision!r}")
