"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL (chat families): the chat template and special tokens of
Qwen2-VL-2B-Instruct, the prompt through the processor's own chat template, answer markers and
end-of-turn tokens, and the processor's image size bounds."""
from __future__ import annotations

import re
from typing import Any, Optional

from .registry import ModelEntry, ModelError

__all__ = ["FAMILIES", "QWEN2_VL_CHAT_TEMPLATE", "QWEN2_VL_SPECIAL_TOKENS", "build_prompt", "processor_kwargs"]

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")

# Qwen2-VL-2B-Instruct's own chat template (chat_template.json of the hub repo).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Special tokens in Qwen2-VL's order (their ids follow the ordinary vocabulary, as in the real one).
QWEN2_VL_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

ANSWER_MARKER = re.compile(r"(?:^|\n)\s*assistant\s*(?:\n|[:：])")
ECHO = None
STOP_PATTERNS: tuple = ()
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")


def build_prompt(entry: ModelEntry, processor: Any = None, instruction: Optional[str] = None) -> str:
    """The processor's chat template around one user message: the image, then the request."""
    if processor is None or not hasattr(processor, "apply_chat_template"):
        raise ModelError(f"{entry.key}: the {entry.family} prompt comes from the processor's chat template; "
                         "pass the processor")
    text = instruction if instruction is not None else entry.prompt
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def processor_kwargs(params: Any) -> dict:
    """``model.min_pixels`` / ``max_pixels`` as the image processor's size bounds."""
    return {"size": {"shortest_edge": params.model.min_pixels, "longest_edge": params.model.max_pixels}}
