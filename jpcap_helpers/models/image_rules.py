"""Which image sizes a model's processor refuses (the size rule ``data.check_image`` takes as ``reject``)."""
from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def _smart_resize():
    """transformers' Qwen2-VL ``smart_resize`` (the PIL-backend module avoids torchvision)."""
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
    except ImportError:  # older/newer layouts
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize
    return smart_resize


def processor_rejection(width: int, height: int) -> str | None:
    """'aspect_ratio' when Qwen2-VL's image processor would refuse a ``width`` x ``height`` image.

    Calls the processor's own ``smart_resize`` (it raises for an aspect ratio above 200; tiny
    images, even 1x1, are upscaled and accepted), so the rule follows the installed transformers.
    """
    try:
        _smart_resize()(height, width)
    except ValueError:
        return "aspect_ratio"
    return None
