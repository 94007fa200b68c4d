"""Asagi (remote code, MIL-UT): the model card's instruction-only Alpaca-style template with
``<image>`` before the request; the answer follows ``### 応答:`` and ends at the next ``###``."""
from __future__ import annotations

import re
from typing import Any, Optional

from .registry import ModelEntry
from .remote_code import processor_kwargs, template_prompt

__all__ = ["FAMILIES", "TEMPLATE", "build_prompt", "processor_kwargs"]

FAMILIES = ("asagi",)
TEMPLATE = ("以下は、タスクを説明する指示です。要求を適切に満たす応答を書きなさい。\n\n"
            "### 指示:\n<image>\n{instruction}\n\n### 応答:\n")
ANSWER_MARKER = re.compile(r"#*\s*応答\s*[:：]")
ECHO = None
STOP_PATTERNS = (re.compile(r"\n*###"),)
STOP_TOKENS: tuple = ()


def build_prompt(entry: ModelEntry, processor: Any = None, instruction: Optional[str] = None) -> str:
    return template_prompt(entry, TEMPLATE, instruction)
