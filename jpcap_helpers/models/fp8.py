"""FP8 matrix products for captioning (``generation.fp8``, opt-in, **not exact**).

An H100/H200 (and Ada GPUs, compute capability ≥ 8.9) multiplies FP8 (e4m3) matrices at twice the
bf16 rate. :func:`to_fp8` swaps the chosen ``nn.Linear`` layers of an inference model for
:class:`Float8Linear`: its weight is stored once in e4m3 with one scale per output channel, and each
input row is scaled to e4m3 on the fly (dynamic per-token scaling), then ``torch._scaled_mm``
multiplies them into bf16. This is the "FP8 dynamic" recipe of common inference servers. Outputs
differ from the bf16 model's (≈ 3.6% relative error per product on Gaussian inputs and weights), so captions
can change: the scope is recorded with every prediction (``weights``), and the quality effect on real
STAIR captions is measured by scoring both runs, not assumed.

Scopes: ``language`` — the language model's attention and MLP projections (prefill and decoding);
``all`` — also the vision tower's blocks (attention and MLP projections). Qwen2-VL, Qwen2.5-VL and
Qwen3-VL only. Never converted: the patch embedding,
the projector (merger), embeddings, norms and ``lm_head`` (small shares of the work, and the argmax
reads ``lm_head`` directly).
"""
from __future__ import annotations

from typing import Any, Iterator, Optional

import torch
import torch.nn as nn

__all__ = ["FP8_SCOPES", "FAMILIES", "MIN_CAPABILITY", "Float8Linear", "fp8_refusal", "fp8_targets", "to_fp8"]

FP8_SCOPES = ("off", "language", "all")
MIN_CAPABILITY = (8, 9)   # FP8 tensor cores: Ada (8.9) and Hopper (9.0) onwards
E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)   # 448
_LANGUAGE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_VISION = ("qkv", "proj", "fc1", "fc2", "gate_proj", "up_proj", "down_proj", "linear_fc1", "linear_fc2")
FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")   # where the layers above were read (transformers 5.24)


def _row_scales(x: torch.Tensor) -> torch.Tensor:
    """One float32 scale per row of ``x`` (2-D) that maps its largest magnitude to e4m3's largest."""
    return x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / E4M3_MAX


def _to_e4m3(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


class Float8Linear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` in e4m3 (per-output-channel scales) and ``x`` scaled per row."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: Optional[torch.Tensor]):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)                           # (out, in) e4m3, row-major
        self.register_buffer("weight_scale", weight_scale.view(1, -1))  # (1, out) float32
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Float8Linear":
        w = linear.weight.detach()
        scale = _row_scales(w)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(_to_e4m3(w, scale).contiguous(), scale.view(-1), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.in_features)
        scale = _row_scales(flat)
        out = torch._scaled_mm(_to_e4m3(flat, scale), self.weight.t(), scale_a=scale, scale_b=self.weight_scale,
                               out_dtype=x.dtype, use_fast_accum=True)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, e4m3"


def fp8_targets(model: nn.Module, scope: str) -> Iterator[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, linear) for every layer ``scope`` converts: the language model's decoder
    layers' projections, and with ``all`` the vision tower's blocks'."""
    if scope not in FP8_SCOPES:
        raise ValueError(f"generation.fp8 must be one of {FP8_SCOPES}, got {scope!r}")
    if scope == "off":
        return
    inner = getattr(model, "model", model)
    groups = [(getattr(getattr(inner, "language_model", None), "layers", None) or [], _LANGUAGE)]
    if scope == "all":
        groups.append((getattr(getattr(inner, "visual", None), "blocks", None) or [], _VISION))
    for blocks, names in groups:
        for block in blocks:
            for parent in block.modules():
                for name in names:
                    child = getattr(parent, name, None)
                    if type(child) is nn.Linear:
                        yield parent, name, child


def fp8_refusal(device: Any = None) -> Optional[str]:
    """Why FP8 products cannot run here (one line, with the fix), or None where they can."""
    if not torch.cuda.is_available():
        return "generation.fp8 needs a CUDA GPU of compute capability ≥ 8.9 (H100, H200, L4): set generation.fp8: off"
    cap = torch.cuda.get_device_capability(device)
    if cap < MIN_CAPABILITY:
        return (f"generation.fp8 needs compute capability ≥ 8.9 (this GPU has {cap[0]}.{cap[1]}; a T4 or A100 has no "
                "FP8 tensor cores): set generation.fp8: off")
    return None


@torch.no_grad()
def to_fp8(model: nn.Module, scope: str) -> int:
    """Swap the ``scope``'s linear layers of an inference model for :class:`Float8Linear` in place;
    returns how many. Where they sit (GPU or CPU) is kept; the caller checks :func:`fp8_refusal`."""
    targets = list(fp8_targets(model, scope))
    for parent, name, linear in targets:
        setattr(parent, name, Float8Linear.from_linear(linear))
    return len(targets)
