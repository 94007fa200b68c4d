"""The one Japanese text normaliser, token-budget truncation and MeCab segmentation.

``normalize_caption`` is applied identically to training captions, references and predictions
(see docs/evaluation.md). Steps, in order, each counted in :class:`NormalizeStats` when it
changes a caption:

1. ``control``: remove control (Cc, except whitespace, which step 5 handles), format (Cf: zero-width
   space/joiner, BOM, bidi marks, soft hyphen, tag characters) and surrogate (Cs) characters.
2. ``emoji``: remove emoji and other pictographs (see ``_PICTOGRAPH_RANGES``), emoji variation
   selectors (U+FE00-FE0F), the combining keycap (U+20E3) and skin-tone modifiers.
3. ``nfkc``: Unicode NFKC: full-width ASCII -> ASCII (``ＡＢＣ１２３`` -> ``ABC123``), half-width
   kana -> full-width (``ｶﾒﾗ`` -> ``カメラ``), ideographic space -> space, ``…`` -> ``...``.
4. ``punctuation``: a small fixed mapping, applied after NFKC:

   - runs of 2+ ``.``, ``。`` or ``・`` (ellipses) -> ``...``;
   - a single ``.`` right after a Japanese character (optional spaces between) and not followed
     by a digit or another dot -> ``。`` (``3.5``, ``ver.2``, ``Mr.`` are untouched);
   - ``,`` with a Japanese character on either side (optional spaces) -> ``、`` (``1,000`` untouched);
   - curly double quotes ``“ ” „ ‟`` -> ``"``; curly single quotes ``‘ ’ ‚ ‛`` -> ``'``;
   - dashes ``‐ ‑ ‒ – — ― −`` -> ``-`` (the katakana long-vowel mark ``ー`` is never touched);
   - wave dashes ``~ ∼`` (``～`` becomes ``~`` under NFKC) -> ``〜``.

5. ``spaces``: whitespace between two Japanese characters (kana, kanji, CJK symbols and
   punctuation, full-width forms) is removed, any other whitespace run becomes one space, and the
   result is stripped.

The function is idempotent: ``normalize_caption(normalize_caption(t)) == normalize_caption(t)``.
"""
from __future__ import annotations

import re
import threading
import unicodedata
from dataclasses import asdict, dataclass
from typing import Any, Iterable

__all__ = [
    "NormalizeStats",
    "normalize_caption",
    "truncate_to_tokens",
    "segment",
    "segment_many",
    "tagger",
    "is_japanese_char",
]

# --------------------------------------------------------------------------- character classes

# Kana, kanji, CJK symbols/punctuation, full-width forms.
_JP_RANGES = (
    "\u3000-\u303f"  # CJK symbols and punctuation (、。「」々〆〜 ...)
    "\u3040-\u309f"  # hiragana
    "\u30a0-\u30ff"  # katakana (incl. ・ and ー)
    "\u31f0-\u31ff"  # katakana phonetic extensions
    "\u3400-\u4dbf"  # CJK extension A
    "\u4e00-\u9fff"  # CJK unified ideographs
    "\uf900-\ufaff"  # CJK compatibility ideographs
    "\uff00-\uffef"  # half-/full-width forms (mostly folded away by NFKC)
    "\U00020000-\U0003134f"  # CJK extensions B-G
)
_JP = f"[{_JP_RANGES}]"
_JP_CHAR_RE = re.compile(_JP)

_PICTOGRAPH_RANGES = (
    "\u203c\u2049"  # ‼ ⁉ (emoji presentation)
    "\u231a\u231b\u2328\u23cf\u23e9-\u23f3\u23f8-\u23fa"  # ⌚ ⌛ ⌨ ⏏ ⏩-⏳ ⏸-⏺
    "\u24c2"  # Ⓜ
    "\u25aa\u25ab\u25b6\u25c0\u25fb-\u25fe"  # emoji-style squares and arrows
    "\u2600-\u27bf"  # miscellaneous symbols, dingbats (☀ ★ ♪ ✂ ✨ ...)
    "\u2934\u2935\u2b05-\u2b07\u2b1b\u2b1c\u2b50\u2b55"  # ⤴ ⤵ ⬅ ⬇ ⬛ ⬜ ⭐ ⭕
    "\u3030\u303d\u3297\u3299"  # 〰 〽 ㊗ ㊙
    "\u20e3"  # combining enclosing keycap
    "\ufe00-\ufe0f"  # variation selectors (emoji/text presentation)
    "\U0001f000-\U0001faff"  # mahjong ... symbols and pictographs extended-A (incl. skin tones)
    "\U0001fc00-\U0001fffd"  # reserved pictographic block
)
_PICTOGRAPH_RE = re.compile(f"[{_PICTOGRAPH_RANGES}]+")

_KEEP_CONTROLS = frozenset("\t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x85")  # whitespace-like Cc

# --------------------------------------------------------------------------- punctuation rules

_ELLIPSIS_RE = re.compile(r"\.{2,}|。{2,}|・{2,}")
_PERIOD_RE = re.compile(rf"(?<={_JP})\s*\.(?![.\d])")
_COMMA_AFTER_JP_RE = re.compile(rf"(?<={_JP})\s*,\s*")
_COMMA_BEFORE_JP_RE = re.compile(rf"\s*,\s*(?={_JP})")
_CHAR_MAP = str.maketrans(
    {
        "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"',
        "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'",
        "\u2010": "-", "\u2011": "-", "\u2012": "-", "\u2013": "-", "\u2014": "-",
        "\u2015": "-", "\u2212": "-",
        "~": "\u301c", "\u223c": "\u301c",
    }
)

_SPACE_BETWEEN_JP_RE = re.compile(rf"(?<={_JP})\s+(?={_JP})")
_SPACE_RUN_RE = re.compile(r"\s+")


@dataclass
class NormalizeStats:
    """Counts of captions seen (``total``), changed at all (``changed``) and changed per step."""

    total: int = 0
    changed: int = 0
    control: int = 0
    emoji: int = 0
    nfkc: int = 0
    punctuation: int = 0
    spaces: int = 0

    STEPS = ("control", "emoji", "nfkc", "punctuation", "spaces")

    def as_dict(self) -> dict[str, int]:
        """Plain dict of all counters (for JSON reports)."""
        return asdict(self)

    def merge(self, other: "NormalizeStats") -> "NormalizeStats":
        """Add ``other``'s counts into this one (in place) and return self."""
        for key, value in other.as_dict().items():
            setattr(self, key, getattr(self, key) + value)
        return self

    def __iadd__(self, other: "NormalizeStats") -> "NormalizeStats":
        return self.merge(other)


def is_japanese_char(ch: str) -> bool:
    """True for kana, kanji, CJK symbols/punctuation and full-width forms."""
    return bool(_JP_CHAR_RE.fullmatch(ch))


def _remove_control(text: str) -> str:
    out = []
    for ch in text:
        cat = unicodedata.category(ch)
        if cat in ("Cf", "Cs") or (cat == "Cc" and ch not in _KEEP_CONTROLS):
            continue
        out.append(ch)
    return "".join(out)


def _map_punctuation(text: str) -> str:
    text = text.translate(_CHAR_MAP)
    text = _ELLIPSIS_RE.sub("...", text)
    text = _PERIOD_RE.sub("。", text)
    text = _COMMA_AFTER_JP_RE.sub("、", text)
    text = _COMMA_BEFORE_JP_RE.sub("、", text)
    return text


def _fix_spaces(text: str) -> str:
    text = _SPACE_BETWEEN_JP_RE.sub("", text)
    return _SPACE_RUN_RE.sub(" ", text).strip()


_STEPS = (
    ("control", _remove_control),
    ("emoji", lambda t: _PICTOGRAPH_RE.sub("", t)),
    ("nfkc", lambda t: unicodedata.normalize("NFKC", t)),
    ("punctuation", _map_punctuation),
    ("spaces", _fix_spaces),
)


def normalize_caption(text: str, stats: NormalizeStats | None = None) -> str:
    """Normalise one Japanese caption (see the module docstring for the exact steps).

    ``stats``, if given, gets ``total`` += 1 and, for each step that changed the caption, that
    step's counter += 1 (and ``changed`` += 1 once).
    """
    if not isinstance(text, str):
        raise TypeError(f"normalize_caption expects str, got {type(text).__name__}")
    original = text
    changed_steps = set()
    for name, step in _STEPS:
        new = step(text)
        if new != text:
            changed_steps.add(name)
        text = new
    # Punctuation and space rules can create input for each other ("。 。" -> "。。" -> "..."):
    # repeat them to a fixed point so that the normaliser is idempotent.
    for _ in range(10):
        new = _fix_spaces(_map_punctuation(text))
        if new == text:
            break
        if _map_punctuation(text) != text:
            changed_steps.add("punctuation")
        if _fix_spaces(text) != text:
            changed_steps.add("spaces")
        text = new
    if stats is not None:
        for name in changed_steps:
            setattr(stats, name, getattr(stats, name) + 1)
    if stats is not None:
        stats.total += 1
        if text != original:
            stats.changed += 1
    return text


# --------------------------------------------------------------------------- truncation


def truncate_to_tokens(text: str, tokenizer: Any, max_tokens: int) -> tuple[str, bool]:
    """Keep at most ``max_tokens`` tokens of ``text``; returns ``(text, was_truncated)``.

    ``tokenizer`` is a Hugging Face tokenizer. The kept token prefix is decoded; a byte-level BPE
    can cut a multi-byte character between tokens, which decodes to U+FFFD, so trailing U+FFFD
    characters that are not in the original text are dropped (the result never has a broken
    character; it may then hold slightly fewer than ``max_tokens`` tokens' worth of text).
    """
    if max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return text, False
    if max_tokens == 0:
        return "", True
    kept = tokenizer.decode(ids[:max_tokens], skip_special_tokens=True, clean_up_tokenization_spaces=False)
    while kept.endswith("\ufffd") and not text.startswith(kept):
        kept = kept[:-1]
    return kept, True


# --------------------------------------------------------------------------- segmentation

_TAGGER = None
_TAGGER_LOCK = threading.Lock()
_DROP_POS1 = frozenset({"補助記号", "空白"})


def tagger():
    """The shared lazy ``fugashi.Tagger`` (MeCab + unidic-lite) of segmentation and the failure flags."""
    global _TAGGER
    if _TAGGER is None:
        with _TAGGER_LOCK:
            if _TAGGER is None:
                import fugashi  # imported lazily: MeCab start-up is not free

                _TAGGER = fugashi.Tagger()
    return _TAGGER


def segment(text: str) -> list[str]:
    """MeCab (unidic-lite) surface forms of ``text``, without punctuation/symbols (POS1 補助記号)
    and whitespace."""
    tokens = []
    for word in tagger()(text):
        surface = word.surface
        if not surface or surface.isspace():
            continue
        pos1 = getattr(word.feature, "pos1", None)
        if pos1 in _DROP_POS1:
            continue
        tokens.extend(surface.split())  # a surface never holds spaces, but be safe for split(" ")
    return tokens


def segment_many(texts: Iterable[str]) -> list[list[str]]:
    """:func:`segment` for each text."""
    return [segment(t) for t in texts]
