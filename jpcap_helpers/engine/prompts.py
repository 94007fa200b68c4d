"""Prompts, output cleaning and stop tokens per model family (pure functions, testable without a
model). The family-specific parts (templates, answer markers, stops) live in the family's module
(``models.family_module(entry.family)``); this module applies them the same way for every family."""
from __future__ import annotations

from typing import Any, Optional

from ..models import ModelEntry, asagi, family_module, llava_jp, qwen_vl, stable_vlm

__all__ = ["CHAT_FAMILIES", "REMOTE_TEMPLATES", "SPECIAL_STOPS", "build_prompt", "clean_output",
           "stop_token_ids", "tokenizer_of"]

CHAT_FAMILIES = qwen_vl.FAMILIES
# text templates of the remote-code families, ``{instruction}`` where the request goes
REMOTE_TEMPLATES = {"llava_jp": llava_jp.TEMPLATE, "asagi": asagi.TEMPLATE, "stable_vlm": stable_vlm.TEMPLATE}

# Markers that end a caption in any family: special tokens a decode may keep, and the start of a next turn.
SPECIAL_STOPS = ["<|im_end|>", "<|endoftext|>", "<|im_start|>", "<|end|>", "</s>", "<eos>", "<pad>",
                 "<EOD|LLM-jp>", "<|eot_id|>"]


def build_prompt(entry: ModelEntry, processor: Any = None, instruction: Optional[str] = None) -> str:
    """The text prompt for one image of ``entry``'s family.

    ``instruction`` replaces the registry request (for chat families the user text, for PaliGemma
    the task prefix, for remote-code families the slot in their template). Chat families need the
    processor (its chat template); the others ignore it.
    """
    return family_module(entry.family).build_prompt(entry, processor, instruction)


def clean_output(entry: ModelEntry, text: str) -> str:
    """Strip what is not the caption: a prompt echo or role prefix before it, special tokens and a
    next turn after it, surrounding whitespace. Nothing else is rewritten."""
    if not isinstance(text, str):
        raise TypeError(f"clean_output expects str, got {type(text).__name__}")
    family = family_module(entry.family)
    if family.ANSWER_MARKER is not None:  # the answer follows the LAST marker (a decode holding the prompt)
        markers = list(family.ANSWER_MARKER.finditer(text))
        if markers:
            text = text[markers[-1].end():]
    if family.ECHO is not None:
        text = family.ECHO.sub("", text, count=1)
    cut = len(text)
    for stop in SPECIAL_STOPS:
        i = text.find(stop)
        if i != -1:
            cut = min(cut, i)
    for pattern in family.STOP_PATTERNS:
        m = pattern.search(text)
        if m is not None:
            cut = min(cut, m.start())
    return text[:cut].strip()


def tokenizer_of(processor: Any) -> Any:
    """The processor's tokenizer (or ``processor`` itself when it is one)."""
    return getattr(processor, "tokenizer", processor)


def stop_token_ids(model: Any, processor: Any, entry: ModelEntry) -> list[int]:
    """End tokens: the generation config's eos ids, the tokenizer's eos, and the family's turn ends
    (``<|im_end|>`` / ``<|endoftext|>`` for Qwen, ``<EOD|LLM-jp>`` for LLaVA-JP) where in the vocab."""
    ids: list[int] = []
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if gen_eos is not None:
        ids += list(gen_eos) if isinstance(gen_eos, (list, tuple)) else [gen_eos]
    tok = tokenizer_of(processor)
    if getattr(tok, "eos_token_id", None) is not None:
        ids.append(tok.eos_token_id)
    vocab = tok.get_vocab() if hasattr(tok, "get_vocab") else {}
    ids += [vocab[t] for t in family_module(entry.family).STOP_TOKENS if t in vocab]
    out: list[int] = []
    for i in ids:
        if i is not None and int(i) not in out:
            out.append(int(i))
    return out
