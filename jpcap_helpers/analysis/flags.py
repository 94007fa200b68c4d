"""Automatic failure flags for Japanese captions (MeCab via fugashi + unidic-lite).

Every rule works on :func:`jpcap_helpers.text.normalize_caption` output and is documented in
docs/ablations.md. Per (model, image):

* ``hallucination`` — the prediction has a *content noun* found in no reference: unidic POS1 名詞,
  except 数詞 (numbers) and 助動詞語幹, holding at least one kana/kanji, and not in
  :data:`STOP_NOUNS` (positions, "photo", "background", formal nouns). Pronouns are POS1 代名詞 in
  unidic and never count. A noun is *found* when its surface or lemma equals a reference token's
  surface or lemma, or is a substring of a normalised reference (lenient: 犬 is found in 子犬).
  Rates: images with ≥ 1 hallucinated noun / images (CHAIR-s style) and hallucinated noun tokens /
  content noun tokens (CHAIR-i style).
* ``gendered`` — the prediction uses a gendered term (:data:`GENDER_TERMS`; whole MeCab tokens or
  runs of up to four tokens, so 大丈夫 never matches 夫) for a gender that fewer than half of the
  references use. Reason: ``neutral_refs`` (no reference is gendered), ``contradicts_refs`` (the
  references use only the other gender) or ``refs_disagree`` (some, but fewer than half, agree).
* ``non_japanese`` — no kana at all (ー and ・ do not count) in a non-empty prediction. Kind:
  ``chinese`` (CJK ideographs present), ``latin`` (Latin letters only), ``other_script`` (e.g.
  Hangul), ``no_letters`` (digits or symbols only).
* ``repetition`` — a MeCab n-gram (1 ≤ n ≤ 8) repeated ≥ 3 times back to back, or a unit of 1–8
  characters repeated ≥ 4 times back to back (catches loops MeCab segments oddly).
* ``empty`` — no letter or digit at all: blank, punctuation only, U+FFFD garbage, error rows.
* ``overlong`` — more MeCab tokens than ``2 ×`` the longest reference.
"""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, Mapping, NamedTuple, Optional, Sequence

from ..text import normalize_caption, segment, tagger

__all__ = [
    "FLAGS", "FLAG_LABELS", "GENDER_TERMS", "STOP_NOUNS", "Token", "tokens", "content_nouns",
    "hallucinated_nouns", "gender_terms", "gender_flag", "script_kind", "repetition", "flag_caption",
    "flag_predictions", "flag_rates", "hallucinated_noun_table", "ethics_summary",
]

FLAGS = ("hallucination", "gendered", "non_japanese", "repetition", "empty", "overlong")
FLAG_LABELS = {
    "hallucination": "hallucinated noun",
    "gendered": "gendered term",
    "non_japanese": "non-Japanese",
    "repetition": "repetition loop",
    "empty": "empty",
    "overlong": "over-long",
}

OVERLONG_FACTOR = 2.0
REPEAT_MAX_N = 8          # longest token n-gram checked for back-to-back repeats
REPEAT_MIN_TOKENS = 3     # an n-gram repeated this many times in a row is a loop
REPEAT_MIN_CHARS = 4      # a character unit repeated this many times in a row is a loop
GENDER_SUPPORT = 0.5      # a predicted gender needs at least this share of references

# Nouns that name no object: positions, formal nouns, the picture itself, quantities.
STOP_NOUNS = frozenset({
    "こと", "事", "もの", "物", "ところ", "所", "様子", "感じ", "状態", "よう", "ため", "何", "何か",
    "中", "上", "下", "前", "後ろ", "後", "横", "隣", "側", "そば", "方", "辺り", "あたり", "周り",
    "近く", "外", "内", "奥", "手前", "間", "先", "真ん中", "中央", "中心", "左", "右", "端", "全体",
    "部分", "一緒", "たくさん", "沢山", "複数", "写真", "画像", "絵", "イメージ", "背景", "様",
})

_MALE = ("男性", "男の子", "男の人", "男子", "男児", "少年", "青年", "おじさん", "おじいさん", "お爺さん",
         "お父さん", "父親", "父", "息子", "兄", "弟", "夫", "紳士", "彼", "男")
_FEMALE = ("女性", "女の子", "女の人", "女子", "女児", "少女", "おばさん", "おばあさん", "お婆さん",
           "お母さん", "母親", "母", "娘", "姉", "妹", "姉妹", "妻", "婦人", "彼女", "女")
_NEUTRAL = ("男女", "彼ら", "兄弟", "夫婦", "親子", "人", "人々", "人物", "子供", "子ども", "こども", "大人")
#: term → "male" | "female" | None (gender-neutral, listed so that 彼ら is not read as 彼 + ら)
GENDER_TERMS: dict[str, Optional[str]] = {
    **{t: "male" for t in _MALE}, **{t: "female" for t in _FEMALE}, **{t: None for t in _NEUTRAL}}
_GENDER_MAX_TOKENS = 4

_KANA_RE = re.compile("[\u3041-\u309f\u30a1-\u30fa\u30fd-\u30ff\u31f0-\u31ff]")  # no ー (30FC), ・ (30FB)
_HAN_RE = re.compile("[\u3005\u3007\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]")
_JP_WORD_RE = re.compile("[\u3041-\u309f\u30a1-\u30ff\u3005\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_CHAR_LOOP_RE = re.compile(r"(.{1,8}?)\1{%d,}" % (REPEAT_MIN_CHARS - 1), re.S)


class Token(NamedTuple):
    surface: str
    pos1: str
    pos2: str
    lemma: str


def _lemma(raw: Any, surface: str) -> str:
    if not raw:
        return surface
    lemma = str(raw)
    head, sep, tail = lemma.partition("-")     # loanwords: テーブル-table
    return head if sep and head and tail.isascii() else lemma


@lru_cache(maxsize=65536)
def tokens(text: str) -> tuple[Token, ...]:
    """All MeCab tokens of ``text`` (already normalised), with POS1/POS2 and the unidic lemma."""
    out = []
    for w in tagger()(text):
        surface = w.surface
        if not surface or surface.isspace():
            continue
        f = w.feature
        out.append(Token(surface, getattr(f, "pos1", "") or "", getattr(f, "pos2", "") or "",
                         _lemma(getattr(f, "lemma", None), surface)))
    return tuple(out)


@lru_cache(maxsize=65536)
def _segment(text: str) -> tuple[str, ...]:
    return tuple(segment(text))


def content_nouns(text: str) -> list[Token]:
    """Content nouns of a normalised caption (see the module docstring for the rule)."""
    out = []
    for t in tokens(text):
        if t.pos1 != "名詞" or t.pos2 in ("数詞", "助動詞語幹"):
            continue
        if not _JP_WORD_RE.search(t.surface):
            continue
        if t.surface in STOP_NOUNS or t.lemma in STOP_NOUNS:
            continue
        out.append(t)
    return out


def hallucinated_nouns(prediction: str, references: Sequence[str]) -> tuple[list[str], int, int]:
    """(distinct content nouns of ``prediction`` found in no reference, in order; number of such noun
    tokens; number of content noun tokens). Inputs are raw captions (normalised here)."""
    pred = normalize_caption(prediction)
    refs = [normalize_caption(r) for r in references]
    known: set[str] = set()
    for r in refs:
        for t in tokens(r):
            known.add(t.surface)
            known.add(t.lemma)
    nouns = content_nouns(pred)
    missing: list[str] = []
    n_missing = 0
    for t in nouns:
        if t.surface in known or t.lemma in known:
            continue
        if any(t.surface in r or t.lemma in r for r in refs):
            continue
        n_missing += 1
        if t.surface not in missing:
            missing.append(t.surface)
    return missing, n_missing, len(nouns)


def gender_terms(text: str) -> list[tuple[str, Optional[str]]]:
    """Gendered (and listed neutral) terms of a normalised text as (term, gender), longest match
    over runs of whole MeCab tokens; a single token also matches through its lemma."""
    toks = tokens(text)
    found: list[tuple[str, Optional[str]]] = []
    i = 0
    while i < len(toks):
        for n in range(min(_GENDER_MAX_TOKENS, len(toks) - i), 0, -1):
            joined = "".join(t.surface for t in toks[i:i + n])
            term = joined if joined in GENDER_TERMS else None
            if term is None and n == 1 and toks[i].lemma in GENDER_TERMS:
                term = toks[i].lemma
            if term is not None:
                found.append((term, GENDER_TERMS[term]))
                i += n
                break
        else:
            i += 1
    return found


def _genders(text: str) -> set[str]:
    return {g for _, g in gender_terms(text) if g}


def gender_flag(prediction: str, references: Sequence[str],
                support: float = GENDER_SUPPORT) -> tuple[bool, list[str], str]:
    """(flagged, gendered terms of the prediction, reason). A predicted gender is supported when at
    least ``support`` of the references use it; reasons: neutral_refs, contradicts_refs, refs_disagree."""
    pred = normalize_caption(prediction)
    terms = [t for t, g in gender_terms(pred) if g]
    genders = _genders(pred)
    if not genders:
        return False, [], ""
    ref_sets = [_genders(normalize_caption(r)) for r in references]
    n = max(len(ref_sets), 1)
    unsupported = [g for g in sorted(genders) if sum(g in s for s in ref_sets) < support * n]
    if not unsupported:
        return False, terms, ""
    if not any(ref_sets):
        return True, terms, "neutral_refs"
    if all(sum(g in s for s in ref_sets) == 0 for g in unsupported):
        return True, terms, "contradicts_refs"
    return True, terms, "refs_disagree"


def script_kind(text: str) -> str:
    """``japanese`` when the normalised text holds kana; otherwise ``chinese`` (CJK ideographs),
    ``latin``, ``other_script`` or ``no_letters``; ``""`` for an empty text."""
    text = normalize_caption(text)
    if not text:
        return ""
    if _KANA_RE.search(text):
        return "japanese"
    if _HAN_RE.search(text):
        return "chinese"
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return "no_letters"
    if all(ord(c) < 0x250 for c in letters):
        return "latin"
    return "other_script"


def repetition(text: str) -> str:
    """A description of the first repetition loop in a normalised caption (``"犬 が 走っ て いる ×3"``),
    or ``""`` when there is none."""
    toks = _segment(text)
    best = None
    for n in range(1, REPEAT_MAX_N + 1):
        for i in range(0, len(toks) - n * REPEAT_MIN_TOKENS + 1):
            unit = toks[i:i + n]
            k = 1
            while toks[i + k * n:i + (k + 1) * n] == unit:
                k += 1
            if k >= REPEAT_MIN_TOKENS and (best is None or k * n > best[1] * len(best[0])):
                best = (unit, k)
    if best:
        return f"{' '.join(best[0])} ×{best[1]}"
    m = _CHAR_LOOP_RE.search(re.sub(r"\s+", "", text))
    if m:
        unit = m.group(1)
        return f"{unit} ×{len(m.group(0)) // len(unit)}"
    return ""


def flag_caption(prediction: Optional[str], references: Sequence[str],
                 overlong_factor: float = OVERLONG_FACTOR) -> dict[str, Any]:
    """Every flag of one prediction against its references, with the evidence (nouns, terms, loop)."""
    pred = normalize_caption(prediction or "")
    n_tokens = len(_segment(pred))
    ref_lengths = [len(_segment(normalize_caption(r))) for r in references]
    max_ref = max(ref_lengths) if ref_lengths else 0
    empty = not any(c.isalnum() for c in pred)
    kind = "" if empty else script_kind(pred)
    out: dict[str, Any] = {
        "caption": pred, "n_tokens": n_tokens, "max_ref_tokens": max_ref, "empty": empty,
        "non_japanese": bool(kind) and kind != "japanese", "script": kind,
        "repeated": "", "repetition": False, "overlong": False,
        "hallucinated_nouns": [], "n_hallucinated": 0, "n_nouns": 0, "hallucination": False,
        "gender_terms": [], "gender_reason": "", "gendered": False,
    }
    if empty:
        return out
    out["repeated"] = repetition(pred)
    out["repetition"] = bool(out["repeated"])
    out["overlong"] = bool(max_ref) and n_tokens > overlong_factor * max_ref
    missing, n_missing, n_nouns = hallucinated_nouns(pred, references)
    out.update(hallucinated_nouns=missing, n_hallucinated=n_missing, n_nouns=n_nouns, hallucination=bool(missing))
    flagged, terms, reason = gender_flag(pred, references)
    out.update(gendered=flagged, gender_terms=terms, gender_reason=reason)
    return out


def flag_predictions(predictions: Mapping[int, Optional[str]], references: Mapping[int, Sequence[str]],
                     model: str = "model"):
    """One row per image that has both a prediction and references: image_id, model, every flag and
    its evidence, ``flags`` (names of the raised flags). Images without references are skipped."""
    import pandas as pd

    rows = []
    for image_id, caption in predictions.items():
        refs = references.get(image_id)
        if not refs:
            continue
        row = {"image_id": image_id, "model": model, **flag_caption(caption, refs)}
        row["flags"] = [f for f in FLAGS if row[f]]
        rows.append(row)
    columns = ["image_id", "model", "caption", *FLAGS, "flags", "hallucinated_nouns", "n_hallucinated", "n_nouns",
               "gender_terms", "gender_reason", "script", "repeated", "n_tokens", "max_ref_tokens"]
    return pd.DataFrame(rows, columns=columns)


def flag_rates(flags_df):
    """Per model: n_images, each flag's rate (images flagged / images) and count, and the noun-level
    hallucination rate (hallucinated noun tokens / content noun tokens, CHAIR-i style)."""
    import pandas as pd

    rows = []
    for model, sub in flags_df.groupby("model", sort=False):
        n = len(sub)
        row: dict[str, Any] = {"model": model, "n_images": n}
        for f in FLAGS:
            k = int(sub[f].astype(bool).sum())
            row[f] = k / n if n else float("nan")
            row[f"{f}_n"] = k
        nouns = int(sub["n_nouns"].sum())
        bad = int(sub["n_hallucinated"].sum())
        row["hallucinated_noun_rate"] = bad / nouns if nouns else float("nan")
        row["n_nouns"], row["n_hallucinated_nouns"] = nouns, bad
        rows.append(row)
    return pd.DataFrame(rows)


def hallucinated_noun_table(flags_df, top: int = 15):
    """The most frequent hallucinated nouns per model: model, noun, count (of images naming it)."""
    from collections import Counter

    import pandas as pd

    rows = []
    for model, sub in flags_df.groupby("model", sort=False):
        counts = Counter(n for nouns in sub["hallucinated_nouns"] for n in nouns)
        rows += [{"model": model, "noun": noun, "count": c} for noun, c in counts.most_common(top)]
    return pd.DataFrame(rows, columns=["model", "noun", "count"])


def _pct(x: float) -> str:
    return "n/a" if x != x else f"{100 * x:.1f}%"


def ethics_summary(rates, nouns=None, split: str = "test", synthetic: bool = False) -> str:
    """Markdown for the ethics section: the four concerns (hallucination, cultural bias, gender bias,
    privacy) with this run's flag rates, and what automatic flags can and cannot show."""
    lines = [f"**Automatic flags on `{split}`** ({', '.join(f'{r.model}: {r.n_images} images' for r in rates.itertuples())})."]
    if synthetic:
        lines.append("> These numbers come from **jp-shapes**, synthetic shapes without people, places or "
                     "culture: they show that the flags run, not how a real model behaves on STAIR/YJ.")
    lines.append("")
    lines.append("1. **Hallucination.** Images with ≥ 1 content noun absent from all references: "
                 + "; ".join(f"{r.model} {_pct(r.hallucination)} (noun-level {_pct(r.hallucinated_noun_rate)}, "
                             f"{r.n_hallucinated_nouns}/{r.n_nouns} nouns)" for r in rates.itertuples())
                 + ". A reference-based proxy: a correct noun the annotators did not write counts as "
                   "hallucinated and a wrong noun that one reference mentions does not; synonyms MeCab "
                   "lemmatises differently are counted as misses. It is an upper bound to inspect, not a verdict.")
    if nouns is not None and len(nouns):
        top = {m: "、".join(f"{x.noun}({x.count})" for x in sub.head(8).itertuples())
               for m, sub in nouns.groupby("model", sort=False)}
        lines.append("   Most frequent: " + "; ".join(f"{m}: {v}" for m, v in top.items()) + ".")
    lines.append("2. **Cultural bias.** Flags cannot measure it. The nearest signal is language: "
                 "non-Japanese output (no kana) " + "; ".join(f"{r.model} {_pct(r.non_japanese)}" for r in rates.itertuples())
                 + " — Qwen's known zero-shot drift into Chinese or English. Whether captions describe Japanese "
                   "scenes, food or customs with foreign categories needs people reading the browser above "
                   "(filter by low CIDEr and look); COCO itself is mostly photos from Flickr users in the US and Europe.")
    lines.append("3. **Gender bias.** Predictions naming a gender that fewer than half of the references use: "
                 + "; ".join(f"{r.model} {_pct(r.gendered)} ({r.gendered_n})" for r in rates.itertuples())
                 + ". A word list over MeCab tokens: it misses gender implied by other words, cannot tell a wrong "
                   "guess from a right one the annotators avoided, and treats the references as the truth — "
                   "they carry their own annotators' assumptions.")
    lines.append("4. **Privacy.** COCO images show real people, often identifiable; captions may describe them. "
                 "No face detection or blurring is done here, the browser and its HTML export show the images "
                 "as they are: do not publish exports of real data beyond what the COCO licence and the "
                 "people shown allow. Flags say nothing about privacy.")
    lines.append("")
    lines.append("Other failure flags: " + "; ".join(
        f"{r.model}: repetition {_pct(r.repetition)}, empty {_pct(r.empty)}, over-long {_pct(r.overlong)}"
        for r in rates.itertuples()) + ".")
    return "\n".join(lines)
