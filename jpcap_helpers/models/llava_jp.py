"""LLaVA-JP v1.1 (remote code: github.com/tosiyuki/LLaVA-JP): ``conv_templates["v1"]``
(SeparatorStyle.TWO, sep " ", roles ユーザー/システム), answer after ``システム:``, ends at
``<EOD|LLM-jp>`` or the next ``ユーザー:`` turn."""
from __future__ import annotations

import re
from typing import Any, Optional

from .registry import ModelEntry
from .remote_code import processor_kwargs, template_prompt

__all__ = ["FAMILIES", "SYSTEM", "TEMPLATE", "build_prompt", "processor_kwargs"]

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
