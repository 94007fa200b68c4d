"""Models: the registry (:mod:`.registry`; one module per family: :mod:`.qwen_vl`, :mod:`.paligemma`,
:mod:`.llava_jp`, :mod:`.asagi`, :mod:`.stable_vlm`; hub code only in a pinned environment,
:mod:`.pinned_env` + :mod:`.pinned_runner`), the offline tiny Qwen2-VL (:mod:`.tiny`, pretrained
by :mod:`.tiny_pretrain`),
loading (:mod:`.loading`), precision (:mod:`.precision`), image size rules (:mod:`.image_rules`) and exact-math fast paths (:mod:`.fastpath`).
See docs/models.md."""
import logging

from .image_rules import processor_rejection
from .loading import (
                      ADAPTER_INFO_FILE,
                      SKIP_QUANT_MODULES,
                      adapter_load_in_4bit,
                      cpu_safe_4bit,
                      load_model,
                      load_processor,
                      load_tokenizer,
                      model_path,
                      pinned_revision,
                      pinned_settings,
                      quantization_config,
                      read_adapter_info,
                      remote_code_opted_in,
                      runs_pinned,
)
from .pinned_env import PinnedEnvError, PinnedRecipe
from .precision import bf16_native, choose_dtype
from .qwen_vl import QWEN2_VL_CHAT_TEMPLATE, QWEN2_VL_SPECIAL_TOKENS
from .registry import (
                      CAPTION_PROMPT_JA,
                      FAMILY_MODULES,
                      FINETUNE_FAMILIES,
                      REGISTRY,
                      ModelEntry,
                      ModelError,
                      contamination_flag,
                      family_module,
                      finetunable,
                      registry_table,
                      resolve,
)
from .tiny import TINY_KEY, build_tiny_model, ensure_tiny_model, tiny_config, tiny_model_dir, train_tiny_tokenizer
from .tiny_pretrain import pretrain_fingerprint, pretrain_tiny_model, read_stamp

__all__ = [
    "CAPTION_PROMPT_JA", "ModelEntry", "ModelError", "REGISTRY", "FAMILY_MODULES", "family_module", "resolve",
    "FINETUNE_FAMILIES", "finetunable", "registry_table", "contamination_flag",
    "QWEN2_VL_CHAT_TEMPLATE", "QWEN2_VL_SPECIAL_TOKENS",
    "TINY_KEY", "train_tiny_tokenizer", "tiny_config", "build_tiny_model", "tiny_model_dir", "ensure_tiny_model",
    "pretrain_tiny_model", "pretrain_fingerprint", "read_stamp",
    "bf16_native", "choose_dtype", "processor_rejection",
    "SKIP_QUANT_MODULES", "ADAPTER_INFO_FILE", "model_path", "pinned_revision", "quantization_config",
    "runs_pinned", "remote_code_opted_in", "pinned_settings", "PinnedRecipe", "PinnedEnvError",
    "cpu_safe_4bit", "read_adapter_info", "adapter_load_in_4bit", "load_processor", "load_model", "load_tokenizer",
]

# bitsandbytes warns on CPUs with avx512bf16 that an optional kernel package is missing; jpcap switches
# that CPU path off on every 4-bit layer (cpu_safe_4bit), so the warning only confuses a newcomer.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
