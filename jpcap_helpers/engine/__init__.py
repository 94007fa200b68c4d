"""The caption engine: prompts and output cleaning per family (:mod:`.prompts`), batched resumable
captioning (:mod:`.pipeline`, levers in :class:`EngineOptions`; a pinned environment's model through
:mod:`.pinned`), the fast greedy decoder
(:mod:`.decode`), canonical visual grids (:mod:`.grids`) and the warm-up (:mod:`.warmup`), captioning runs over a params file's splits (:mod:`.runs`) and notebook tables
(:mod:`.tables`). See docs/models.md."""
from ..models import contamination_flag
from .images import folder_records, load_image_for_model
from .options import EngineOptions
from .pinned import caption_records_pinned
from .pipeline import caption_records
from .prompts import CHAT_FAMILIES, REMOTE_TEMPLATES, build_prompt, clean_output, stop_token_ids
from .runs import (
                   CONSTANT_SYSTEM,
                   FINETUNED_SUFFIX,
                   caption_file,
                   prediction_path,
                   run_finetuned,
                   run_zero_shot,
                   write_constant_baseline,
                   write_prediction_meta,
)
from .tables import before_after_table, sample_items, sample_table

__all__ = [
    "EngineOptions", "CHAT_FAMILIES", "REMOTE_TEMPLATES", "build_prompt", "clean_output", "stop_token_ids",
    "load_image_for_model", "folder_records", "caption_records", "caption_records_pinned", "contamination_flag",
    "FINETUNED_SUFFIX", "CONSTANT_SYSTEM", "prediction_path", "write_prediction_meta", "run_zero_shot",
    "run_finetuned", "caption_file", "write_constant_baseline", "before_after_table", "sample_table", "sample_items",
]
