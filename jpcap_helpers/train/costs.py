"""The training cost model: model FLOPs per caption from the architecture, and what they mean on a GPU
whose effective throughput we assume (a T4 by default). Used by the plan (printed before training), the
benchmarks' MFU and the sizing of params/colab_t4.yaml (docs/training.md, "Cost model")."""
from __future__ import annotations

from typing import Any

__all__ = ["T4_FP16_PEAK_TFLOPS", "T4_EFFECTIVE_TFLOPS", "training_flops_per_sample", "packed_flops_per_caption",
           "model_flops_per_sample", "model_flops_per_caption", "count_parameters_unpacked", "cost_estimate"]

T4_FP16_PEAK_TFLOPS = 65.0
# ESTIMATE, not measured here (no T4 was available): ≈ 18% of the fp16 peak, i.e. the "few samples/s" a
# T4 is reported to reach on the Qwen2-VL-2B QLoRA recipe (≈ 4 TFLOP per caption → ≈ 3 captions/s).
T4_EFFECTIVE_TFLOPS = 12.0


def training_flops_per_sample(n_vit: int, n_llm: int, seq_len: float, n_patches: float) -> float:
    """2·N_vit·patches (frozen ViT: forward only) + 6·N_llm·seq (language model forward + backward: LoRA and
    frozen layers still back-propagate activations to reach the projector). Gradient-checkpointing
    recompute is not counted (model FLOPs, as MFU counts them)."""
    return 2 * n_vit * n_patches + 6 * n_llm * seq_len


def packed_flops_per_caption(n_vit: int, n_llm: int, prefix_len: float, caption_len: float, n_patches: float,
                             captions_per_image: float) -> float:
    """Model FLOPs per caption with ``train.pack_captions``: the ViT and the image+prompt prefix once per
    image, shared by its ``captions_per_image`` captions; each caption adds only its own tokens
    (attention FLOPs are not counted, as in :func:`training_flops_per_sample`). With one caption per image
    it equals :func:`training_flops_per_sample` of the unpacked row (``prefix_len + caption_len``)."""
    c = float(captions_per_image)
    return training_flops_per_sample(n_vit, n_llm, prefix_len + c * caption_len, n_patches) / c


def model_flops_per_caption(model: Any, prefix_len: float, caption_len: float, n_patches: float,
                            captions_per_image: float = 1.0) -> float:
    """:func:`packed_flops_per_caption` for a Qwen2-VL-family model (1 caption per image: unpacked)."""
    from .lora import causal_lm

    base = causal_lm(model).model
    return packed_flops_per_caption(count_parameters_unpacked(base.visual), count_parameters_unpacked(base.language_model),
                                    prefix_len, caption_len, n_patches, captions_per_image)


def model_flops_per_sample(model: Any, seq_len: float, n_patches: float) -> float:
    """:func:`training_flops_per_sample` for a Qwen2-VL-family model (peft-wrapped or not)."""
    from .lora import causal_lm

    base = causal_lm(model).model
    return training_flops_per_sample(count_parameters_unpacked(base.visual),
                                     count_parameters_unpacked(base.language_model), seq_len, n_patches)


def count_parameters_unpacked(module: Any) -> int:
    """Parameters as the model has them: a 4-bit tensor packs two values per stored element."""
    return sum(p.numel() * (2 if type(p).__name__ == "Params4bit" else 1) for p in module.parameters())


def cost_estimate(flops_per_sample: float, n_samples: int, effective_tflops: float = T4_EFFECTIVE_TFLOPS) -> dict:
    """Seconds for ``n_samples`` training captions at ``effective_tflops`` (default: a T4, estimated)."""
    per_s = effective_tflops * 1e12 / flops_per_sample
    return {"tflop_per_sample": flops_per_sample / 1e12, "effective_tflops": effective_tflops,
            "samples_per_s": per_s, "seconds": n_samples / per_s, "hours": n_samples / per_s / 3600}
