"""What trains: every weight frozen, LoRA (peft) on the top-k language layers, the projector
(``model.visual.merger``, and Qwen3-VL's deepstack mergers ``model.visual.deepstack_merger_list.*``)
trained or not; the vision tower never builds an autograd graph."""
from __future__ import annotations

import re
import warnings
from typing import Any

from ..models.registry import FINETUNE_FAMILIES
from .errors import TrainError

__all__ = ["LORA_TARGETS", "SUPPORTED_MODEL_TYPES", "causal_lm", "text_layer_count", "lora_target_modules",
           "projector_modules", "prepare_model", "count_parameters"]

LORA_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# the fast path matches transformers' forward for these (tests/test_train.py, tests/test_qwen3_train.py);
# their config model_type is their registry family
SUPPORTED_MODEL_TYPES = FINETUNE_FAMILIES
_LAYER_RE = re.compile(r"(?:^|\.)language_model\.layers\.(\d+)\.")


def causal_lm(model: Any) -> Any:
    """The transformers model under PEFT / accelerate / DDP wrappers."""
    while True:
        if hasattr(model, "module") and not hasattr(model, "lm_head"):  # DDP
            model = model.module
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            return model


def text_layer_count(model: Any) -> int:
    """How many language (not vision) decoder layers the model has."""
    names = [n for n, _ in model.named_modules()]
    idx = {int(m.group(1)) for n in names if "visual" not in n for m in [_LAYER_RE.search(n)] if m}
    if not idx:
        raise TrainError(f"{type(model).__name__}: no language_model.layers.N modules found (not a Qwen-VL model?)")
    return max(idx) + 1


def lora_target_modules(model: Any, top_k_layers: int | str) -> list[str]:
    """Full names of q/k/v/o/gate/up/down projections in the top-k language layers (never visual)."""
    n_layers = text_layer_count(model)
    if top_k_layers == "all":
        top = set(range(n_layers))
    else:
        if not isinstance(top_k_layers, int) or top_k_layers < 1:
            raise TrainError(f"train.top_k_layers: expected an int ≥ 1 or 'all', got {top_k_layers!r}")
        if top_k_layers > n_layers:
            raise TrainError(f"train.top_k_layers: {top_k_layers} > the model's {n_layers} language layers "
                             "(use 'all' or a smaller number)")
        top = set(range(n_layers - top_k_layers, n_layers))
    out = []
    for name, _ in model.named_modules():
        if "visual" in name.split("."):
            continue
        m = _LAYER_RE.search(name)
        if m and int(m.group(1)) in top and name.endswith(LORA_TARGETS):
            out.append(name)
    if not out:
        raise TrainError("no LoRA target modules found in the language layers")
    return out


def projector_modules(model: Any) -> list[str]:
    """The projector as peft ``modules_to_save`` names: ``merger`` (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) and
    Qwen3-VL's deepstack mergers, which project intermediate ViT layers into the language model."""
    from ..models.deepstack import projector_module_names

    return projector_module_names(model.model.visual)


def _add_lora(model: Any, t: Any) -> Any:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=t.lora_rank, lora_alpha=t.lora_alpha, lora_dropout=t.lora_dropout, bias="none",
                        target_modules=lora_target_modules(model, t.top_k_layers), task_type="CAUSAL_LM",
                        modules_to_save=projector_modules(model) if t.projector == "trainable" else None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)   # peft reads a deprecated transformers property
        return get_peft_model(model, config)


def _checkpoint_language_layers(base: Any) -> None:
    """Non-reentrant gradient checkpointing on the language layers only, without input-grad hooks."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # transformers hooks every input embedding (also the ViT patch embed) to require grad; the
    # non-reentrant checkpoint does not need it and the frozen ViT must stay graph-free
    if hasattr(base, "disable_input_require_grads"):
        base.disable_input_require_grads()
    visual = base.model.visual
    visual.gradient_checkpointing = False
    for module in visual.modules():
        if hasattr(module, "gradient_checkpointing"):
            module.gradient_checkpointing = False


def prepare_model(model: Any, params: Any) -> Any:
    """Freeze everything, add LoRA (peft) to the top-k language layers, train the projector or not.

    Returns the ``PeftModel``. Trainable weights are fp32 (mixed precision keeps fp32 masters); the
    vision tower keeps its load dtype and never builds an autograd graph (see
    :func:`~jpcap_helpers.train.loss.caption_loss`); gradient checkpointing
    (``train.gradient_checkpointing``) is non-reentrant on the language layers only, so no input
    embedding has to require grad.
    """
    import torch

    from ..models.fastpath import compile_blocks, compile_supported, use_lean_activations

    t = params.train
    model_type = getattr(model.config, "model_type", "")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise TrainError(f"fine-tuning {model_type or type(model).__name__} is not supported: the fast path "
                         "covers Qwen2-VL, Qwen2.5-VL and Qwen3-VL (model types "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}), tested equal to their transformers forward; "
                         "zero-shot captioning of other models works")
    for p in model.parameters():
        p.requires_grad_(False)
    for cfg in (model.config, getattr(model.config, "text_config", None)):
        if cfg is not None:
            cfg.use_cache = False
    peft_model = _add_lora(model, t)
    base = causal_lm(peft_model)
    # same outputs, fewer activations kept for backward (SwiGLU, RMSNorm): docs/training.md
    use_lean_activations(base.model.language_model)
    compiled = bool(params.model.compile and compile_supported(model_type) and not t.gradient_checkpointing)
    if compiled and t.cudagraphs:
        # each batch shape its own CUDA graph (docs/training.md "CUDA graphs"): specialised, since dynamic
        # shapes under cudagraph trees crashed in the compiled backward (torch 2.11, run CG-2)
        compile_blocks(base.model.language_model.layers, dynamic=False, mode="reduce-overhead")
    elif compiled:
        # compiled layers inside gradient checkpointing were never measured: those run eagerly. Dynamic
        # from the start: caption batches change their sequence length all the time (validation's last
        # micro-batch its size too); specialised graphs recompiled mid-run (run ETA-2: 19 s at step 5)
        compile_blocks(base.model.language_model.layers, dynamic=True, tuned=params.model.compile_tuning != "off")
    base.jpcap_compiled = compiled
    base.jpcap_cudagraphs = compiled and t.cudagraphs   # caption_loss then begins each forward as a new step
    if t.gradient_checkpointing:
        _checkpoint_language_layers(base)
    for name, p in peft_model.named_parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
        if p.requires_grad and "visual" in name and "merger" not in name:
            raise TrainError(f"internal: vision parameter {name} is trainable")
    peft_model.train()
    return peft_model


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as their unpacked sizes."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if hasattr(p, "quant_state") or type(p).__name__ == "Params4bit":
            n *= 2  # two 4-bit values per stored byte
        total += n
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total
