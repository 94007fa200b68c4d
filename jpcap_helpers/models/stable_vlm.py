"""Japanese Stable VLM (remote code, stabilityai): the model card's ``build_prompt``. The registry
prompt is its ``caption`` task; a request (``instruction``) uses the ``vqa`` task with the request as
input. No ``<image>`` tag: the model prepends the image itself."""
from __future__ import annotations

import re
from typing import Any, Optional

from .registry import ModelEntry
from .templates import processor_kwargs, template_prompt

__all__ = ["FAMILIES", "SYSTEM", "TEMPLATE", "build_prompt", "processor_kwargs"]

FAMILIES = ("stable_vlm",)
SYSTEM = "以下は、タスクを説明する指示と、文脈のある入力の組み合わせです。要求を適切に満たす応答を書きなさい。"
# build_prompt(task="vqa", input=instruction)
TEMPLATE = (SYSTEM + "\n\n### 指示: \n与えられた画像を下に、質問に答えてください。"
            "\n\n### 入力: \n{instruction}\n\n### 応答: \n")
ANSWER_MARKER = re.compile(r"#*\s*応答\s*[:：]")
ECHO = None
STOP_PATTERNS = (re.compile(r"\n*###"),)
STOP_TOKENS: tuple = ()


def build_prompt(entry: ModelEntry, processor: Any = None, instruction: Optional[str] = None) -> str:
    return template_prompt(entry, TEMPLATE, instruction)
