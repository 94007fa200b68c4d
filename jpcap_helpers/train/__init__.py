"""QLoRA / LoRA fine-tuning of a Qwen2-VL / Qwen2.5-VL / Qwen3-VL captioner on processed STAIR-format pairs (or jp-shapes).

One loop for every face: the tiny model on a CPU (fp32), a free Colab T4 (fp16 + loss scaling, 4-bit
NF4 language model), a big GPU (bf16) and several GPUs under ``accelerate launch`` (DDP).
docs/training.md describes the recipe, the fast path, checkpoints and resume.

Modules: :mod:`.batches` (pairs, dataset, collator, order), :mod:`.grouping` (micro-batches grouped by
visual grid), :mod:`.lora` (what trains),
:mod:`.loss` (the fast-path loss), :mod:`.session` (set-up shared by plan and train), :mod:`.steps`
(one optimizer step), :mod:`.planning` (probe, ETA, Colab fit), :mod:`.shapes` (batch shapes of a run,
for ``train.cudagraphs``), :mod:`.validation`,
:mod:`.checkpoint` and :mod:`.rng` (save/resume, nothing unpickled), :mod:`.logs`, :mod:`.export`
(adapter, merge) and :mod:`.loop` (:func:`train`).
"""
from .batches import (
                      ASSISTANT_HEADER,
                      CUDAGRAPH_PAD_MULTIPLE,
                      END_TOKEN,
                      IGNORE_INDEX,
                      PAD_MULTIPLE,
                      CaptionCollator,
                      PairDataset,
                      StepBatchSampler,
                      chat_messages,
                      epoch_order,
                      read_pairs,
                      read_val_records,
                      truncate_captions,
)
from .checkpoint import KEEP_CHECKPOINTS, RESUME_FREE_KEYS, list_checkpoints, resume_fingerprint
from .errors import TrainError
from .export import export_adapter, merge_adapter
from .grouping import group_window, grouped_order, pair_grids
from .logs import TrainResult, read_train_log
from .loop import TrainOptions, train
from .lora import (
                   LORA_TARGETS,
                   causal_lm,
                   count_parameters,
                   lora_target_modules,
                   prepare_model,
                   projector_modules,
                   text_layer_count,
)
from .loss import caption_loss, language_forward, plain_loss, visual_features
from .planning import COLAB_FREE_T4_USABLE_HOURS, COLAB_SESSION_MAX_HOURS, format_plan, plan
from .steps import MAX_CONSECUTIVE_NONFINITE

__all__ = [
    # running
    "train", "plan", "format_plan", "TrainOptions", "TrainResult", "TrainError", "read_train_log",
    "list_checkpoints", "merge_adapter", "export_adapter", "resume_fingerprint", "RESUME_FREE_KEYS",
    "KEEP_CHECKPOINTS", "MAX_CONSECUTIVE_NONFINITE", "COLAB_SESSION_MAX_HOURS", "COLAB_FREE_T4_USABLE_HOURS",
    # data
    "read_pairs", "read_val_records", "truncate_captions", "PairDataset", "CaptionCollator", "chat_messages",
    "epoch_order", "StepBatchSampler", "IGNORE_INDEX", "PAD_MULTIPLE", "CUDAGRAPH_PAD_MULTIPLE", "ASSISTANT_HEADER",
    "END_TOKEN", "grouped_order",
    "group_window", "pair_grids",
    # model and loss
    "prepare_model", "lora_target_modules", "projector_modules", "text_layer_count", "count_parameters", "causal_lm",
    "LORA_TARGETS",
    "caption_loss", "plain_loss", "visual_features", "language_forward",
]
