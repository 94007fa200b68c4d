"""What the remote-code families share: a text template with ``{instruction}`` where the request goes
(the registry's ``prompt`` of each such entry is the full default text). Loading and captioning them
needs each model's own code and is not implemented (docs/models.md)."""
from __future__ import annotations

from typing import Any, Optional

from .registry import ModelEntry

__all__ = ["template_prompt", "processor_kwargs"]


def template_prompt(entry: ModelEntry, template: str, instruction: Optional[str]) -> str:
    """The registry prompt, or ``template`` with ``instruction`` in its slot."""
    return entry.prompt if instruction is None else template.format(instruction=instruction)


def processor_kwargs(params: Any) -> dict:
    return {}
