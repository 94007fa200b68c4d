"""PaliGemma: a task prefix (``caption ja``) as the prompt; the processor adds the ``<image>`` tokens,
BOS and the closing newline itself and keeps its own fixed input size."""
from __future__ import annotations

import re
from typing import Any, Optional

from .registry import ModelEntry

__all__ = ["FAMILIES", "build_prompt", "processor_kwargs"]

FAMILIES = ("paligemma",)
ANSWER_MARKER = None
ECHO = re.compile(r"^\s*(?:<image>)*(?:<bos>)?\s*caption [a-z]{2}(?:-[A-Za-z]+)?\s*\n")  # a decoded prefix
STOP_PATTERNS: tuple = ()
STOP_TOKENS: tuple = ()


def build_prompt(entry: ModelEntry, processor: Any = None, instruction: Optional[str] = None) -> str:
    """``<image>`` once, then the prefix: PaliGemmaProcessor expands ``<image>`` to image_seq_length
    tokens and appends BOS after the last image token and "\\n" after the prefix (transformers 5
    ``prepare_inputs_layout``)."""
    prefix = (instruction if instruction is not None else entry.prompt).strip()
    return "<image>" + prefix


def processor_kwargs(params: Any) -> dict:
    return {}
