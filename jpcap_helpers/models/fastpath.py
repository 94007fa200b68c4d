"""Exact-math speed and memory patches for an already-loaded Qwen-VL model, applied in place.

``use_linear_patch_embed``: the vision patch embedding's Conv3d (kernel == stride over pre-cut
patches) as the equivalent matmul; cuDNN's bf16 Conv3d is far slower than a GEMM of this shape.

``use_batched_vision_attention``: transformers' Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision attention, for
every non-flash implementation, reads ``cu_seqlens`` back to the host (``lengths.tolist()``: one device
sync in every block) and calls attention once per image. The patched forward (SDPA only) computes the
segment plan once per vision forward and caches it on the ``cu_seqlens`` tensor itself (the same object
reaches every block), groups the segments by length (a slice where a group's segments lie back to back,
else gathered by index and scattered back) and attends each group as one batch
``(n_segments, heads, L, head_dim)``. Attention never crosses a segment either way and nothing is
masked, so the math is the original's; batching only changes how SDPA's kernel is launched. One SDPA
call per distinct segment length: one per block for images of one size; Qwen2.5-VL's window blocks get
one per window size (4 for a 364×504 grid, where runs of consecutive equal windows gave 8 per image).
Under ``torch.compile`` the plan and the attention calls stay out of the traced code (the block's
projections and MLP are compiled around them), so a batch with a new plan compiles nothing.

``compile_blocks``: regional ``torch.compile`` (each vision block / language layer compiled in place) fuses
the many small element-wise kernels of these blocks; ``compile_supported`` says where it is used;
``tuned=True`` also tunes each fused kernel's launch configuration by benchmarking it on first use
(:data:`TUNING_OPTIONS`, ``model.compile_tuning``).

``use_lean_activations``: for the language model only, SwiGLU ``silu(gate) * up`` and RMSNorm become
custom autograd Functions with the same forward ops (bit-identical outputs) that save less for backward:
SwiGLU keeps ``gate`` and ``up`` (not also ``silu(gate)``) and recomputes ``silu(gate)`` in backward
with the kernels autograd uses (input dtype; a first version computing in fp32 temporaries cost 20% of
a micro-batch-48 step); RMSNorm keeps the input in its own dtype plus the fp32 ``rstd`` (not the fp32
upcast and the normalised copy) and computes its analytic backward in fp32 (fp64 for fp64 inputs). Only the elementwise part
is replaced, so LoRA-wrapped or 4-bit projections are untouched.
"""
from __future__ import annotations

import importlib
import types
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["use_linear_patch_embed", "use_batched_vision_attention", "use_lean_activations", "SwiGLUFunction", "RMSNormFunction",
           "compile_supported", "compile_blocks"]

# Vision attention classes whose forward was read (transformers 5.24): qkv -> rotary -> per-segment
# attention -> reshape -> proj. The three are line-for-line the same.
_VISION_ATTENTION = [
    ("transformers.models.qwen2_vl.modeling_qwen2_vl", "VisionAttention"),
    ("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2_5_VLVisionAttention"),
    ("transformers.models.qwen3_vl.modeling_qwen3_vl", "Qwen3VLVisionAttention"),
]
_VISION_SKIP = {"visual", "vision_tower", "vision_model"}


def _linear_patch_embed_forward(self, hidden_states):
    """Conv3d with kernel == stride over pre-cut patches is one matmul: same result, no slow 3-D
    convolution kernel (cuDNN's bf16 Conv3d is far slower than a GEMM of this shape)."""
    weight = self.proj.weight
    flat = hidden_states.reshape(-1, weight[0].numel()).to(weight.dtype)
    return F.linear(flat, weight.reshape(weight.shape[0], -1), self.proj.bias).view(-1, self.embed_dim)


def use_linear_patch_embed(model) -> int:
    """Swap the Qwen-VL vision patch embedding's Conv3d for the equivalent matmul; returns how many
    modules changed (0 for models without such a patch embedding)."""
    n = 0
    for module in model.modules():
        proj = getattr(module, "proj", None)
        if (type(module).__name__.endswith("PatchEmbed") and isinstance(proj, torch.nn.Conv3d)
                and tuple(proj.kernel_size) == tuple(proj.stride) and hasattr(module, "embed_dim")):
            module.forward = types.MethodType(_linear_patch_embed_forward, module)
            n += 1
    return n


def _verified_vision_classes() -> dict[type, tuple]:
    """{class: (its module's apply_rotary_pos_emb_vision, its original forward)} for the classes present."""
    found = {}
    for mod_name, cls_name in _VISION_ATTENTION:
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            continue
        cls = getattr(mod, cls_name, None)
        if cls is not None and hasattr(mod, "apply_rotary_pos_emb_vision"):
            found[cls] = (mod.apply_rotary_pos_emb_vision, cls.forward)
    return found


def _segment_groups(cu_seqlens: torch.Tensor) -> list[tuple[int, int, object]]:
    """[(length, n_segments, where)]: the segments grouped by length, ``where`` the first position when
    a group's segments lie back to back (a slice), else a device index of its ``n * length`` positions.
    Cached on ``cu_seqlens`` (one host read per vision forward; recomputed if modified in place)."""
    try:
        version = cu_seqlens._version
    except RuntimeError:                                      # inference tensors keep no version counter
        version = None
    cached = getattr(cu_seqlens, "_jpcap_groups", None)
    if cached is not None and cached[0] == version:
        return cached[1]
    bounds = cu_seqlens.tolist()
    starts: dict[int, list[int]] = {}
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b > a:                                             # an empty window contributes nothing
            starts.setdefault(b - a, []).append(a)
    plan: list[tuple[int, int, object]] = []
    for length, firsts in starts.items():
        if all(f == firsts[0] + j * length for j, f in enumerate(firsts)):
            plan.append((length, len(firsts), firsts[0]))
        else:
            index = torch.tensor(firsts, device=cu_seqlens.device).unsqueeze(1) + torch.arange(
                length, device=cu_seqlens.device)
            plan.append((length, len(firsts), index.flatten()))
    plan.sort(key=lambda g: g[2] if isinstance(g[2], int) else -1)
    cu_seqlens._jpcap_groups = (version, plan)
    return plan


def _take(t: torch.Tensor, where, count: int) -> torch.Tensor:
    """A group's rows of ``t``: a slice from ``where`` (an int), else the rows at the index ``where``."""
    return t[where:where + count] if isinstance(where, int) else t.index_select(0, where)


@torch.compiler.disable
def _grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                       dropout: float, scale: float) -> torch.Tensor:
    """Attention within each segment, one SDPA call per segment length: ``(seq, heads * head_dim)``.
    Never traced by ``torch.compile`` (the compiled block breaks around it): the plan's Python ints and
    its slice/index mix would otherwise become guards, and batches with other plans would recompile
    until the recompile limit (a COCO-like training mix did; the ViT's matmuls stay compiled)."""
    seq_length = q.shape[0]
    groups = _segment_groups(cu_seqlens)
    outs = []
    for length, n, where in groups:
        qs, ks, vs = (_take(t, where, n * length).unflatten(0, (n, length)).transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, dropout_p=dropout, scale=scale, is_causal=False)
        outs.append(o.transpose(1, 2).reshape(n * length, -1))  # (n*L, heads*head_dim)
    if all(isinstance(w, int) for _, _, w in groups):          # slices back to back, in order: concatenate
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
    out = outs[0].new_zeros(seq_length, outs[0].shape[1])    # scattered windows: put each row back
    for (length, n, where), o in zip(groups, outs):
        if isinstance(where, int):
            out = out.slice_scatter(o, 0, where, where + n * length)
        else:
            out = out.index_copy(0, where, o)
    return out


def _batched_vision_attention_forward(self, hidden_states, cu_seqlens, position_embeddings=None,
                                      max_seqlen=None, **kwargs):
    """The verified VisionAttention forward with one SDPA call per segment length."""
    rope, original = self._jpcap_vision_impl
    if self.config._attn_implementation != "sdpa":           # switched after patching: original path
        return original(self, hidden_states, cu_seqlens, position_embeddings, max_seqlen, **kwargs)
    seq_length = hidden_states.shape[0]
    q, k, v = self.qkv(hidden_states).reshape(seq_length, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q, k = rope(q, k, cos, sin)                               # (seq, heads, head_dim) each
    dropout = 0.0 if not self.training else self.attention_dropout
    attn_output = _grouped_attention(q, k, v, cu_seqlens, dropout, self.scaling)
    return self.proj(attn_output.reshape(seq_length, -1).contiguous())


def use_batched_vision_attention(model: torch.nn.Module) -> int:
    """Batch the vision tower's per-image SDPA calls (see the module docstring); only modules configured
    for ``sdpa`` change. Returns how many attention modules were patched."""
    classes = _verified_vision_classes()
    n = 0
    for module in model.modules():
        impl = classes.get(type(module))
        if (impl is None or "forward" in module.__dict__
                or getattr(module.config, "_attn_implementation", None) != "sdpa"):
            continue
        module._jpcap_vision_impl = impl
        module.forward = types.MethodType(_batched_vision_attention_forward, module)
        n += 1
    return n


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)          # fp32, or fp64 for fp64 inputs


class SwiGLUFunction(torch.autograd.Function):
    """``silu(gate) * up`` saving only ``gate`` and ``up``; backward recomputes ``silu(gate)``."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        gate, up = ctx.saved_tensors
        # the kernels autograd itself would run (silu_backward computes in fp32 registers), plus one
        # recomputation of silu(gate): four passes in the input dtype, no fp32 temporaries
        grad_gate = grad_up = None
        if ctx.needs_input_grad[1]:
            grad_up = grad_out * F.silu(gate)
        if ctx.needs_input_grad[0]:
            grad_gate = torch.ops.aten.silu_backward(grad_out * up, gate)
        return grad_gate, grad_up


class RMSNormFunction(torch.autograd.Function):
    """HF's RMSNorm (upcast, ``x * rsqrt(mean(x²) + eps)``, cast back, times weight) saving the input in
    its own dtype and the fp32 ``rstd`` ([..., 1]). Upcasts to fp32 as HF does (fp64 stays fp64)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        h = x.to(_acc_dtype(x.dtype))
        rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (h * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        acc = rstd.dtype
        xhat = x.to(acc) * rstd
        go = grad_out.to(acc)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            gxhat = go * weight.to(acc)
            grad_x = (rstd * (gxhat - xhat * (gxhat * xhat).mean(-1, keepdim=True))).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (go * xhat).reshape(-1, xhat.shape[-1]).sum(0).to(weight.dtype)
        return grad_x, grad_w, None


def _lean_mlp_forward(self, x):
    return self.down_proj(SwiGLUFunction.apply(self.gate_proj(x), self.up_proj(x)))


def _lean_rmsnorm_forward(self, hidden_states):
    return RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon)


def _text_modules(model: torch.nn.Module):
    """Modules of the language model: under ``language_model`` when there is one, else all but vision."""
    named = list(model.named_modules())
    has_lm = any("language_model" in name.split(".") for name, _ in named)
    for name, module in named:
        parts = set(name.split("."))
        if parts & _VISION_SKIP or (has_lm and "language_model" not in parts):
            continue
        yield module


def _is_silu(act) -> bool:
    from transformers.activations import SiLUActivation

    return isinstance(act, (torch.nn.SiLU, SiLUActivation))


def use_lean_activations(model: torch.nn.Module) -> int:
    """Swap the language model's SwiGLU MLPs and RMSNorms for the lean Functions (same outputs, fewer
    saved bytes). Returns how many modules were patched."""
    n = 0
    for module in _text_modules(model):
        if "forward" in module.__dict__:                      # already patched (or otherwise overridden)
            continue
        if (all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj"))
                and _is_silu(getattr(module, "act_fn", None))):
            module.forward = types.MethodType(_lean_mlp_forward, module)
        elif (type(module).__name__.endswith("RMSNorm") and isinstance(getattr(module, "weight", None), torch.Tensor)
              and module.weight.dim() == 1 and isinstance(getattr(module, "variance_epsilon", None), float)):
            module.forward = types.MethodType(_lean_rmsnorm_forward, module)
        else:
            continue
        n += 1
    return n


# model types whose compiled blocks were measured on a GPU (speed, and the same losses and captions
# as eager): benchmarks/RESULTS.md; others run eagerly until measured
COMPILE_MEASURED = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def compile_supported(model_type: str) -> bool:
    """Whether regional ``torch.compile`` is used: a measured model type on a CUDA GPU of compute
    capability ≥ 8.0 (not on CPU, where the tests run, nor on a T4, where it was never tried)."""
    return (model_type in COMPILE_MEASURED and torch.cuda.is_available()
            and torch.cuda.get_device_capability() >= (8, 0))


RECOMPILE_LIMIT = 64   # dynamo's per-frame limit (default 8) for the compiled blocks: see compile_blocks

# inductor's coordinate-descent tuning: each fused element-wise/reduction kernel's block sizes and warps are
# searched by timing on its first call (cached on the machine with the compiled code). Same math, other
# launch configurations (reductions may sum in another order). On an H100 (run T1, benchmarks/RESULTS.md):
# the compiled training step's Triton kernels -10% (the ViT's LayerNorms -40%), bf16 LoRA +2%; captioning
# +2.7% (+5.5% with FP8), its first batches +33 s of tuning; training's first step no slower.
TUNING_OPTIONS = {"coordinate_descent_tuning": True}


def compile_blocks(blocks, dynamic: Optional[bool] = None, tuned: bool = False, **compile_kwargs) -> int:
    """``Module.compile()`` each block in place (same parameters and state_dict keys). Blocks of one class
    share one compiled graph; ``dynamic=None`` specialises on the first shapes and recompiles once when
    they change, ``True`` compiles for any size from the start. Returns the count.

    Every transformers block runs through one frame (``GradientCheckpointingLayer.__call__``), so the
    vision blocks and each language-layer variant — with or without LoRA, input requiring grad or not,
    training or validation, static or dynamic — are all entries of that frame; dynamo's default limit
    of 8 entries then falls back to eager code for the rest (run ETA-2: a COCO-like mix hit it at step 12).
    So the limit is raised to :data:`RECOMPILE_LIMIT` (torch's setting is process-wide).

    ``tuned``: compiled with :data:`TUNING_OPTIONS` (not with a ``mode``: torch takes one or the other)."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    if tuned:
        if "mode" in compile_kwargs:
            raise ValueError("compile_blocks: tuned=True and a mode cannot be combined (torch.compile takes one)")
        compile_kwargs["options"] = {**compile_kwargs.get("options", {}), **TUNING_OPTIONS}
    n = 0
    for block in blocks:
        if getattr(block, "_compiled_call_impl", None) is None:
            block.compile(dynamic=dynamic, **compile_kwargs)
            n += 1
    return n
