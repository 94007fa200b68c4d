"""Constrained greedy decoding (``generation.constraints``, docs/human_eval.md#mitigations): one set of
rules, applied by both decoders to the next-token logits before the argmax.

* **scripts** — every vocabulary token whose text holds a letter of a banned script (``latin``,
  ``hangul``, ``cyrillic``, ``greek``, ``thai``, ``arabic``) gets ``-inf``. Digits, punctuation,
  whitespace, kana, CJK ideographs and special tokens (end tokens included) are never touched.
  Limit: byte-level vocabularies hold partial-UTF-8 tokens (decoded as U+FFFD); they are kept (rare
  Japanese characters need them), so a model could still spell a banned character byte by byte.
  Chinese drift cannot be blocked by script: Chinese and Japanese share the ideographs.
* **word lists** — listed terms (``word_list: gendered``: the male/female terms of
  :data:`jpcap_helpers.analysis.flags.GENDER_TERMS`, plus ``ban_words``) are turned into their token
  sequences (the term alone and with a leading space). A one-token term is a static logit bias; a
  longer one is banned as a sequence: its last token is biased on the steps where the tokens just
  generated equal the rest of it (computed on the device from the generated ids, no host
  synchronisation, inside the CUDA graph). ``word_penalty`` null bans (``-inf``), a number subtracts
  it instead. Limit: only these tokenisations are covered; a tokenizer can spell the same characters
  through other token splits (e.g. 男 + 性 for 男性), and removing a word does not remove the bias
  that chose it (the model may write another word with the same assumption).
* **no_repeat_ngram_size** — n > 0: a token that would complete an n-gram already generated in this
  caption gets ``-inf`` (over the new tokens only, not the prompt; the same rule on both decoders).

:class:`Constraints` holds the tensors; :meth:`Constraints.apply` is the one function both the HF
``LogitsProcessor`` (:class:`ConstraintProcessor`) and the fast decoder's step call.
"""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

__all__ = ["SCRIPTS", "ConstraintReport", "Constraints", "build_constraints", "gendered_terms", "token_script_mask",
           "ConstraintProcessor", "describe"]

# banned-script ranges (code points, inclusive)
SCRIPTS: dict[str, tuple[tuple[int, int], ...]] = {
    "latin": ((0x41, 0x5A), (0x61, 0x7A), (0xC0, 0x24F), (0x1E00, 0x1EFF), (0xFF21, 0xFF3A), (0xFF41, 0xFF5A)),
    "hangul": ((0x1100, 0x11FF), (0x3130, 0x318F), (0xA960, 0xA97F), (0xAC00, 0xD7AF), (0xD7B0, 0xD7FF)),
    "cyrillic": ((0x400, 0x52F), (0x1C80, 0x1C8F), (0x2DE0, 0x2DFF), (0xA640, 0xA69F)),
    "greek": ((0x370, 0x3FF), (0x1F00, 0x1FFF)),
    "thai": ((0xE00, 0xE7F),),
    "arabic": ((0x600, 0x6FF), (0x750, 0x77F), (0x8A0, 0x8FF)),
}


def gendered_terms() -> list[str]:
    """The male and female terms the ``gendered`` flag looks for (neutral terms such as 人 excluded)."""
    from ..analysis.flags import GENDER_TERMS

    return [t for t, g in GENDER_TERMS.items() if g]


def _char_script(c: str, scripts: Sequence[str]) -> Optional[str]:
    o = ord(c)
    for name in scripts:
        if any(lo <= o <= hi for lo, hi in SCRIPTS[name]):
            # Latin-1 symbols (×, ÷, ª …) are not letters
            if name == "latin" and not unicodedata.category(c).startswith("L"):
                continue
            return name
    return None


def token_script_mask(tokenizer: Any, scripts: Sequence[str], keep_ids: Iterable[int] = ()) -> tuple[list[int], dict]:
    """(ids of tokens holding a letter of a banned script, counts per script). Special and added
    tokens and ``keep_ids`` are never banned."""
    unknown = [s for s in scripts if s not in SCRIPTS]
    if unknown:
        raise ValueError(f"unknown script {unknown[0]!r} (known: {', '.join(SCRIPTS)})")
    if not scripts:
        return [], {}
    n = len(tokenizer)
    keep = set(int(i) for i in keep_ids) | set(getattr(tokenizer, "all_special_ids", []) or [])
    keep |= set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    texts = tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)
    banned, counts = [], {s: 0 for s in scripts}
    for i, text in enumerate(texts):
        if i in keep:
            continue
        for c in text:
            hit = _char_script(c, scripts)
            if hit:
                banned.append(i)
                counts[hit] += 1
                break
    return banned, counts


@dataclass
class ConstraintReport:
    """What a word list became: single-token and multi-token terms, and the terms skipped (why)."""
    single_token: list[str] = field(default_factory=list)
    multi_token: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    n_duplicates: int = 0
    n_script_tokens: dict = field(default_factory=dict)

    def summary(self) -> str:
        parts = [f"{len(self.single_token)} single-token and {len(self.multi_token)} multi-token terms"]
        if self.n_script_tokens:
            parts.append("script-banned tokens " + ", ".join(f"{k} {v}" for k, v in self.n_script_tokens.items()))
        if self.skipped:
            parts.append(f"{len(self.skipped)} terms skipped (" + "; ".join(
                f"{t!r}: {why}" for t, why in list(self.skipped.items())[:5]) + ")")
        if self.n_duplicates:
            parts.append(f"{self.n_duplicates} duplicate terms ignored")
        return "; ".join(parts)


class Constraints:
    """Device tensors of one constraint set: ``bias`` (vocabulary), banned sequences (prefix, mask, last
    token, value) and the no-repeat n-gram size. :meth:`apply` has fixed shapes and no host reads."""

    def __init__(self, vocab_size: int, bias_ids: dict[int, float], sequences: list[tuple[tuple[int, ...], float]],
                 no_repeat_ngram_size: int = 0, report: Optional[ConstraintReport] = None,
                 config: Optional[dict] = None):
        import torch

        self.vocab_size = int(vocab_size)
        self.bias = torch.zeros(self.vocab_size)
        for i, v in bias_ids.items():
            if 0 <= i < self.vocab_size:
                self.bias[i] = v
        self.width = max((len(s) - 1 for s, _ in sequences), default=0)
        w = max(self.width, 1)
        self.prefix = torch.zeros((len(sequences), w), dtype=torch.long)
        self.prefix_mask = torch.zeros((len(sequences), w), dtype=torch.bool)
        self.last = torch.tensor([s[-1] for s, _ in sequences], dtype=torch.long)
        self.value = torch.tensor([v for _, v in sequences], dtype=torch.float32)
        for k, (seq, _) in enumerate(sequences):
            body = seq[:-1]
            self.prefix[k, w - len(body):] = torch.tensor(body)
            self.prefix_mask[k, w - len(body):] = True
        self.ngram = int(no_repeat_ngram_size)
        self.report = report or ConstraintReport()
        self.config = dict(config or {})
        self._on: dict = {}

    @property
    def active(self) -> bool:
        return bool((self.bias != 0).any()) or self.last.numel() > 0 or self.ngram > 0

    def to(self, device: Any, dtype: Any) -> "Constraints":
        """The tensors on ``device`` (bias in ``dtype``), cached."""
        key = (str(device), dtype)
        if key not in self._on:
            self._on[key] = (self.bias.to(device=device, dtype=dtype), self.prefix.to(device),
                             self.prefix_mask.to(device), self.last.to(device), self.value.to(device=device, dtype=dtype))
        return self

    def apply(self, logits: Any, generated: Any, n_generated: Any) -> Any:
        """``logits`` (B, V') adjusted for rows whose generated tokens are ``generated[:, :n_generated]``
        (``generated``: (B, T) buffer, ``n_generated``: a 0-d device tensor or int; positions past it are
        ignored). Pure tensor ops, no host synchronisation (CUDA-graph safe)."""
        import torch

        self.to(logits.device, logits.dtype)
        bias, prefix, pmask, last, value = self._on[(str(logits.device), logits.dtype)]
        v = min(self.vocab_size, logits.shape[-1])
        out = logits.clone()
        out[:, :v] += bias[:v]
        bsz, total = generated.shape
        n = torch.as_tensor(n_generated, device=logits.device)
        if last.numel():
            w = prefix.shape[1]
            idx = n - w + torch.arange(w, device=logits.device)          # the last w generated positions
            hist = generated.index_select(1, idx.clamp(min=0, max=max(total - 1, 0)))  # (B, w)
            valid = idx >= 0
            eq = (hist[:, None, :] == prefix[None]) & valid[None, None, :]
            match = (eq | ~pmask[None]).all(-1)                           # (B, S)
            add = torch.where(match, value[None, :], torch.zeros((), dtype=out.dtype, device=out.device))
            out.scatter_add_(1, last[None, :].expand(bsz, -1), add)
        k = self.ngram
        if k > 0 and total >= k:
            if k == 1:
                seen = torch.arange(total, device=logits.device)[None, :] < n
                add = torch.where(seen, float("-inf"), 0.0).to(out.dtype)
                out.scatter_add_(1, generated, add.expand(bsz, -1))
            else:
                j = torch.arange(total - k + 1, device=logits.device)             # n-gram starts
                tail_idx = n - (k - 1) + torch.arange(k - 1, device=logits.device)
                tail = generated.index_select(1, tail_idx.clamp(min=0, max=total - 1))   # (B, k-1)
                windows = generated.unfold(1, k - 1, 1)[:, :total - k + 1]          # (B, J, k-1)
                match = (windows == tail[:, None, :]).all(-1)
                match &= ((j + k - 1) < n)[None, :] & (n >= k - 1)              # the n-gram lies in the past
                add = torch.where(match, float("-inf"), 0.0).to(out.dtype)
                out.scatter_add_(1, generated[:, k - 1:], add)
        return out


def _term_sequences(tokenizer: Any, term: str) -> list[tuple[int, ...]]:
    seqs = []
    for text in (term, " " + term):
        ids = tuple(int(i) for i in tokenizer.encode(text, add_special_tokens=False))
        if ids and ids not in seqs:
            seqs.append(ids)
    return seqs


def build_constraints(tokenizer: Any, cfg: Any, eos_ids: Sequence[int] = (), vocab_size: Optional[int] = None) -> Optional[Constraints]:
    """A :class:`Constraints` from ``generation.constraints`` (:class:`jpcap_helpers.params.ConstraintParams`
    or a mapping with its keys), or None when nothing is constrained. Terms that are empty, hold the
    unknown token or would ban a special/end token are skipped and counted in the report."""
    get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
    scripts = list(get("ban_scripts", []) or [])
    words = list(gendered_terms() if get("word_list", "none") == "gendered" else []) + list(get("ban_words", []) or [])
    penalty = get("word_penalty", None)
    ngram = int(get("no_repeat_ngram_size", 0) or 0)
    config = {"ban_scripts": scripts, "word_list": get("word_list", "none"), "ban_words": list(get("ban_words", []) or []),
              "word_penalty": penalty, "no_repeat_ngram_size": ngram}
    if not scripts and not words and not ngram:
        return None
    report = ConstraintReport()
    special = set(int(i) for i in eos_ids) | set(getattr(tokenizer, "all_special_ids", []) or [])
    unk = getattr(tokenizer, "unk_token_id", None)
    bias: dict[int, float] = {}
    banned, report.n_script_tokens = token_script_mask(tokenizer, scripts, special)
    for i in banned:
        bias[i] = float("-inf")
    value = float("-inf") if penalty is None else -float(penalty)
    sequences: list[tuple[tuple[int, ...], float]] = []
    seen: set[str] = set()
    for raw in words:
        term = raw.strip() if isinstance(raw, str) else raw
        if not isinstance(term, str) or not term:
            report.skipped[repr(raw)] = "empty term"
            continue
        if term in seen:
            report.n_duplicates += 1
            continue
        seen.add(term)
        seqs = _term_sequences(tokenizer, term)
        if any(unk is not None and unk in s for s in seqs):
            report.skipped[term] = "holds the tokenizer's unknown token (untokenizable)"
            continue
        if any(i in special for s in seqs for i in s):
            report.skipped[term] = "tokenises to a special/end token (banning it would stop captions ending)"
            continue
        for s in seqs:
            if len(s) == 1:
                bias[s[0]] = min(bias.get(s[0], 0.0), value)
            else:
                sequences.append((s, value))
        (report.single_token if len(seqs[0]) == 1 else report.multi_token).append(term)
    return Constraints(vocab_size or len(tokenizer), bias, sequences, ngram, report, config)


def describe(constraints: Optional[Constraints]) -> Optional[dict]:
    """The provenance record of a constraint set (``.meta.json`` ``generation.constraints``)."""
    if constraints is None:
        return None
    r = constraints.report
    return {**constraints.config, "n_single_token_terms": len(r.single_token), "n_multi_token_terms": len(r.multi_token),
            "skipped_terms": dict(r.skipped), "script_banned_tokens": dict(r.n_script_tokens)}


class ConstraintProcessor:
    """A ``transformers`` logits processor applying :meth:`Constraints.apply` to the tokens generated
    after the prompt (HF ``generate``, greedy or beam)."""

    def __init__(self, constraints: Constraints, prompt_length: int):
        self.constraints, self.prompt_length = constraints, int(prompt_length)

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        generated = input_ids[:, self.prompt_length:]
        n = generated.shape[1]
        if n == 0:
            import torch
            generated = torch.zeros((input_ids.shape[0], 1), dtype=torch.long, device=input_ids.device)
        return self.constraints.apply(scores, generated, n)
