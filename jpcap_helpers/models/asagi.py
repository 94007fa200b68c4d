"""Asagi (``MIL-UT/Asagi-2B``) on transformers' own ``LlavaForConditionalGeneration`` — no remote code.

Asagi's hub code is the transformers-4.45 Llava (SigLIP so400m-384 + 2-layer MLP + llm-jp-3 Llama);
its checkpoint keeps the 4.45 key layout (``language_model.model.*``, ``vision_tower.vision_model.*``,
``multi_modal_projector.*``), which transformers 5 renames on load. What 4.45 did implicitly is made
explicit here, read from the folder's ``config.json`` at load: the vision feature layer and selection
strategy, the image token id, and how many tokens one ``<image>`` expands to
((image_size / patch_size)² + extra tokens − 1 for the "default" strategy). 4.45 expanded the image
inside the model; transformers 5 expects the processor to do it, so the processor is built here with
those numbers. Prompt: the model card's instruction-only Alpaca-style template with ``<image>`` before
the request; the answer follows ``### 応答:`` and ends at the next ``###``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional

from .registry import ModelEntry, ModelError
from .snapshot import local_folder, snapshot_commit
from .templates import processor_kwargs, template_prompt

__all__ = ["FAMILIES", "TEMPLATE", "CARD_GENERATION", "build_prompt", "processor_kwargs", "llava_config",
           "image_token_count", "load_model", "load_processor"]

FAMILIES = ("asagi",)
TEMPLATE = ("以下は、タスクを説明する指示です。要求を適切に満たす応答を書きなさい。\n\n"
            "### 指示:\n<image>\n{instruction}\n\n### 応答:\n")
ANSWER_MARKER = re.compile(r"#*\s*応答\s*[:：]")
ECHO = None
STOP_PATTERNS = (re.compile(r"\n*###"),)
STOP_TOKENS: tuple = ()
# the model card's sampling settings (recorded; jpcap captions greedily unless told otherwise)
CARD_GENERATION = {"do_sample": True, "num_beams": 5, "max_new_tokens": 256, "temperature": 0.7,
                   "repetition_penalty": 1.5}
# transformers 4.45 LlavaConfig defaults, for keys an old config.json leaves out
_LLAVA_445_DEFAULTS = {"image_token_index": 32000, "projector_hidden_act": "gelu",
                       "vision_feature_select_strategy": "default", "vision_feature_layer": -2}
_EXTRA_TOKENS = {"clip_vision_model": 1, "siglip_vision_model": 0}  # CLS token or none


def build_prompt(entry: ModelEntry, processor: Any = None, instruction: Optional[str] = None) -> str:
    return template_prompt(entry, TEMPLATE, instruction)


def _fail(name: str, folder: Path, what: str, fix: str) -> ModelError:
    return ModelError(f"{name} ({folder}): {what}. {fix}")


def llava_config(folder: str | Path, name: str = "asagi") -> Any:
    """The folder's ``config.json`` as a transformers 5 ``LlavaConfig`` (its ``auto_map`` to remote
    code dropped; keys 4.45 left implicit filled with 4.45's defaults)."""
    from transformers import LlavaConfig

    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise _fail(name, folder, "no config.json", "Point the model path at a folder in the hub layout of "
                    "MIL-UT/Asagi-2B (config.json, weights, tokenizer and preprocessor files).")
    raw = json.loads(path.read_text(encoding="utf-8"))
    kind = raw.get("model_type")
    if kind not in ("llava", "asagi") or not isinstance(raw.get("vision_config"), dict) \
            or not isinstance(raw.get("text_config"), dict):
        raise _fail(name, folder, f"config.json is a {kind!r} model, not a LLaVA-layout model with vision_config "
                    "and text_config (another family)", "Use this folder under its own registry entry, or point "
                    "the model path at an Asagi folder.")
    vision_type = raw["vision_config"].get("model_type")
    if vision_type not in _EXTRA_TOKENS:
        raise _fail(name, folder, f"vision tower {vision_type!r} is not ported (SigLIP or CLIP only)",
                    "Use the pinned-environment runner (model.loads: pinned_env) for this checkpoint.")
    fields = {**_LLAVA_445_DEFAULTS, **{k: v for k, v in raw.items() if k not in ("auto_map", "model_type")}}
    if fields.get("vision_feature_select_strategy") not in ("default", "full"):
        raise _fail(name, folder, f"vision_feature_select_strategy {fields['vision_feature_select_strategy']!r} "
                    "is neither 'default' nor 'full'", "Fix config.json.")
    return LlavaConfig(**fields)


def image_token_count(config: Any) -> int:
    """How many ``<image>`` tokens one image expands to (what 4.45 Llava inserted in the model)."""
    vision = config.vision_config
    n = (vision.image_size // vision.patch_size) ** 2 + _EXTRA_TOKENS[vision.model_type]
    return n - 1 if config.vision_feature_select_strategy == "default" else n


def _processor(folder: Path, config: Any, name: str) -> Any:
    from transformers import AutoImageProcessor, AutoTokenizer, LlavaProcessor
    from transformers.utils import logging as hf_logging

    if not any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise _fail(name, folder, "no tokenizer files", "Copy the checkpoint's tokenizer files into the folder.")
    if not (folder / "preprocessor_config.json").is_file():
        raise _fail(name, folder, "no preprocessor_config.json (the image preprocessing)",
                    "Copy the checkpoint's preprocessor_config.json into the folder.")
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the processor config of 4.45 lacks keys 5.x expects
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        image_processor = AutoImageProcessor.from_pretrained(str(folder))
    finally:
        hf_logging.set_verbosity(level)
    image_token = "<image>"  # what the prompt template writes
    ids = tokenizer.encode(image_token, add_special_tokens=False)
    if ids != [config.image_token_index]:
        raise _fail(name, folder, f"the tokenizer reads {image_token} as {ids}, not as the one token "
                    f"image_token_index {config.image_token_index} of config.json",
                    "Tokenizer and config do not belong together.")
    size = getattr(image_processor, "size", None) or {}
    side = size.get("height") or size.get("shortest_edge")
    if side and side != config.vision_config.image_size:
        raise _fail(name, folder, f"the image processor resizes to {side} px but the vision tower takes "
                    f"{config.vision_config.image_size} px", "preprocessor_config.json and config.json disagree.")
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                               patch_size=config.vision_config.patch_size,
                               vision_feature_select_strategy=config.vision_feature_select_strategy,
                               image_token=image_token,
                               num_additional_image_tokens=_EXTRA_TOKENS[config.vision_config.model_type])
    processor.tokenizer.padding_side = "left"
    return processor


def load_processor(entry: ModelEntry, path: str, revision: Optional[str] = None) -> Any:
    """The processor alone (tokenizer + SigLIP preprocessing + ``<image>`` expansion; no weights read)."""
    folder = local_folder(path, revision)
    return _processor(folder, llava_config(folder, entry.key), entry.key)


def load_model(entry: ModelEntry, path: str, dtype: Any, revision: Optional[str] = None) -> tuple[Any, Any]:
    """(model, processor) of ``path`` (a folder in the hub layout, or a hub id): transformers' own
    ``LlavaForConditionalGeneration`` with the config mapped by :func:`llava_config`. Every weight of
    the model must come from the checkpoint, else a :class:`ModelError` names what is missing."""
    from transformers import LlavaForConditionalGeneration
    from transformers.utils import logging as hf_logging

    folder = local_folder(path, revision)
    config = llava_config(folder, entry.key)
    processor = _processor(folder, config, entry.key)
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("pytorch_model*.bin")):
        raise _fail(entry.key, folder, "no weights (*.safetensors or pytorch_model*.bin)",
                    "Download the checkpoint's weight files into the folder.")
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = LlavaForConditionalGeneration.from_pretrained(
            str(folder), config=config, dtype=dtype, output_loading_info=True, use_safetensors=None)
    finally:
        hf_logging.set_verbosity(level)
    missing = [k for k in info.get("missing_keys", []) if ".head." not in k]  # SigLIP's unused pooling head
    if missing or info.get("mismatched_keys"):
        what = f"missing {len(missing)} weights (e.g. {sorted(missing)[:3]})" if missing else \
            f"weights of the wrong shape (e.g. {list(info['mismatched_keys'])[:2]})"
        raise _fail(entry.key, folder, f"the checkpoint does not fill the model: {what}",
                    "Point the model path at a complete Asagi checkpoint whose config.json matches its weights.")
    model.jpcap_commit = snapshot_commit(path, folder)
    return model.eval(), processor
