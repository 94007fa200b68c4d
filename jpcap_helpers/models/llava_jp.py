"""LLaVA-JP v1.1 (``toshi456/llava-jp-1.3b-v1.1``), ported natively (:mod:`.llava_jp_model`: SigLIP +
S2 features + projector + GPT-2 from transformers' own classes; no remote code). Prompt: the original's
``conv_templates["v1"]`` (SeparatorStyle.TWO, sep " ", roles ユーザー/システム); the answer follows
``システム:`` and ends at ``<EOD|LLM-jp>`` or the next ``ユーザー:`` turn."""
from __future__ import annotations

import re
from typing import Any, Optional

from .registry import ModelEntry, ModelError
from .snapshot import local_folder, snapshot_commit
from .templates import processor_kwargs, template_prompt

__all__ = ["FAMILIES", "SYSTEM", "TEMPLATE", "build_prompt", "processor_kwargs", "load_model", "load_processor"]

FAMILIES = ("llava_jp",)
SYSTEM = ("これは好奇心旺盛なユーザーと人工知能システムのチャットです。"
          "システムはユーザーの質問に親切、詳細、丁寧に答える。")
TEMPLATE = SYSTEM + " ユーザー: <image>\n{instruction} システム: "
ANSWER_MARKER = re.compile(r"システム\s*[:：]")
ECHO = None
STOP_PATTERNS = (re.compile(r"ユーザー\s*[:：]"),)
STOP_TOKENS = ("<EOD|LLM-jp>",)


def build_prompt(entry: ModelEntry, processor: Any = None, instruction: Optional[str] = None) -> str:
    return template_prompt(entry, TEMPLATE, instruction)


def load_model(entry: ModelEntry, path: str, dtype: Any, revision: Optional[str] = None) -> tuple[Any, Any]:
    """(model, processor) of ``path``: a local folder in the hub layout, or a hub id (from the local
    cache when offline). Raises :class:`~.registry.ModelError` naming the model and the fix; a hub id
    that is neither cached nor reachable raises an OSError (``loading.hub_errors`` words it)."""
    from .llava_jp_model import load_llava_jp

    folder = local_folder(path, revision)
    try:
        model, processor = load_llava_jp(folder, dtype)
    except ModelError as exc:  # name the registry entry too
        raise ModelError(f"{entry.key}: {exc}") from None
    model.jpcap_commit = snapshot_commit(path, folder)
    return model, processor


def load_processor(entry: ModelEntry, path: str, revision: Optional[str] = None) -> Any:
    """The processor alone (tokenizer + the vision tower's image preprocessing; no weights read)."""
    from .llava_jp_model import load_llava_jp_processor

    folder = local_folder(path, revision)
    try:
        return load_llava_jp_processor(folder)
    except ModelError as exc:
        raise ModelError(f"{entry.key}: {exc}") from None
