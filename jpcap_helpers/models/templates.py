"""What the template-prompt families (LLaVA-JP, Asagi, Japanese Stable VLM) share: a text template
with ``{instruction}`` where the request goes (the registry's ``prompt`` of each such entry is the full
default text)."""
from __future__ import annotations

from typing import Any, Optional

from .registry import ModelEntry

__all__ = ["template_prompt", "processor_kwargs"]


def template_prompt(entry: ModelEntry, template: str, instruction: Optional[str]) -> str:
    """The registry prompt, or ``template`` with ``instruction`` in its slot."""
    return entry.prompt if instruction is None else template.format(instruction=instruction)


def processor_kwargs(params: Any) -> dict:
    return {}
