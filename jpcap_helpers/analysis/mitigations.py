"""Measured effect of mitigations: captions of the same images with and without constrained decoding
(:func:`constraint_comparison`), and a rule-based filter from the automatic flags
(:func:`rule_filter`), each with CIDEr and flag rates and their bootstrap CIs over images.

Honest by construction: a constraint only removes tokens, so the table shows what it costs (CIDEr,
changed captions) and what it leaves (flags still raised, banned terms spelled another way)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from .. import io as jio
from . import flags as jflags

__all__ = ["VARIANTS", "flag_rate_cis", "score_variant", "constraint_comparison", "rule_filter", "compact"]

#: the variants 06 and benchmarks/constraints_effect.py compare (generation.constraints values)
VARIANTS: dict[str, dict] = {
    "none": {},
    "scripts+gendered+norepeat3": {"ban_scripts": ["latin", "hangul", "cyrillic"], "word_list": "gendered",
                                   "no_repeat_ngram_size": 3},
}
RATE_FLAGS = ("hallucination", "gendered", "non_japanese", "repetition", "empty")


def flag_rate_cis(flags_df: Any, n_resamples: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, list[float]]:
    """``{flag: [rate, lo, hi]}``: each flag's image rate with a percentile bootstrap CI over images."""
    from ..evaluate import resample_weights

    n = len(flags_df)
    out = {}
    tail = (1 - level) / 2 * 100
    for f in RATE_FLAGS:
        x = flags_df[f].astype(float).to_numpy() if n else np.zeros(0)
        if not n:
            out[f] = [float("nan")] * 3
            continue
        reps = np.concatenate([w @ x / n for w in resample_weights(n, n_resamples, seed)])
        lo, hi = np.percentile(reps, [tail, 100 - tail])
        out[f] = [float(x.mean()), float(lo), float(hi)]
    return out


def score_variant(predictions: Mapping[int, str], references: Mapping[int, Sequence[str]], label: str,
                  n_resamples: int = 1000, seed: int = 0) -> dict:
    """One table row: CIDEr with its CI and every rate flag with its CI for ``predictions``."""
    from ..evaluate import score

    refs = {i: references[i] for i in predictions if i in references}
    preds = {i: predictions[i] for i in refs}
    s = score(refs, preds, n_resamples=n_resamples, seed=seed)
    fl = jflags.flag_predictions(preds, refs, model=label)
    row: dict[str, Any] = {"variant": label, "n_images": s["n_images"], "CIDEr": s["CIDEr"],
                           "CIDEr_lo": s["ci"]["CIDEr"][0], "CIDEr_hi": s["ci"]["CIDEr"][1]}
    for f, (rate, lo, hi) in flag_rate_cis(fl, n_resamples, seed).items():
        row.update({f: rate, f"{f}_lo": lo, f"{f}_hi": hi})
    return row


def _captions(path: Path) -> dict[int, str]:
    return {int(r["image_id"]): r.get("caption") or "" for r in jio.read_jsonl(path, tolerate_partial_last=True)
            if "image_id" in r}


def constraint_comparison(params: Any, variants: Optional[Mapping[str, Mapping]] = None, split: str = "test",
                          adapter: Optional[str | Path] = None, max_images: Optional[int] = None,
                          out_dir: Optional[str | Path] = None, n_resamples: Optional[int] = None):
    """Caption ``split`` with the base model (and the adapter, when given) once per constraint variant
    into ``<out_dir>/<variant>/<system>__<split>.jsonl`` (resumable; default out_dir
    ``<run_dir>/mitigations``), then one row per (system, variant): CIDEr and flag rates with
    bootstrap CIs, captions changed against the first variant, and captions still holding a banned
    term (as text: a ban covers only the term's own tokenisation)."""
    import pandas as pd

    from ..engine import caption_records
    from ..engine.constraints import gendered_terms
    from ..engine.runs import FINETUNED_SUFFIX
    from ..evaluate import load_references
    from ..models import load_model
    from ..params import ConstraintParams

    variants = dict(variants or VARIANTS)
    out_dir = Path(out_dir or Path(params.run_dir) / "mitigations")
    ref_path = Path(params.processed_dir) / f"{split}.jsonl"
    records = list(jio.read_jsonl(ref_path))[:max_images]
    references = load_references(ref_path)
    n_resamples = n_resamples or params.evaluate.bootstrap_samples
    rows = []
    for adapter_path in [None] + ([str(adapter)] if adapter else []):
        model, processor, entry = load_model(params, adapter=adapter_path)
        system = entry.key + (FINETUNED_SUFFIX if adapter_path else "")
        first: Optional[dict[int, str]] = None
        try:
            for name, cfg in variants.items():
                cons = ConstraintParams(**cfg)
                path = out_dir / name / f"{system}__{split}.jsonl"
                summary = caption_records(model, processor, entry, records, params.images_dir, path,
                                          batch_size=params.generation.batch_size,
                                          max_new_tokens=params.generation.max_new_tokens,
                                          decoder=params.generation.decoder, extra={"split": split},
                                          constraints=cons, progress=False)
                caps = _captions(path)
                row = {"system": system, **score_variant(caps, references, name, n_resamples, params.evaluate.seed),
                       "decoder": summary["decoder"]}
                banned = (gendered_terms() if cons.word_list == "gendered" else []) + list(cons.ban_words)
                row["n_changed"] = 0 if first is None else sum(caps.get(i) != c for i, c in first.items())
                row["n_banned_term_left"] = sum(any(t in c for t in banned) for c in caps.values()) if banned else 0
                rows.append(row)
                first = caps if first is None else first
        finally:
            del model, processor
    return pd.DataFrame(rows)


def rule_filter(pred_path: str | Path, references_path: str | Path, out_path: str | Path,
                drop: Sequence[str] = ("non_japanese", "empty", "repetition"), n_resamples: int = 1000,
                seed: int = 0):
    """Drop the captions raising any of ``drop`` (flags of :mod:`.flags`) from a predictions file:
    writes the kept rows atomically to ``out_path`` and returns a two-row table (all vs kept: images,
    coverage, CIDEr and flag rates with CIs). Dropping changes the image set: compare coverage too."""
    import pandas as pd

    from ..evaluate import load_references

    refs = load_references(references_path)
    rows_in = [r for r in jio.read_jsonl(pred_path, tolerate_partial_last=True) if r.get("image_id") in refs]
    caps = {int(r["image_id"]): r.get("caption") or "" for r in rows_in}
    fl = jflags.flag_predictions(caps, refs)
    bad = set(fl.loc[fl[list(drop)].any(axis=1), "image_id"]) if len(fl) else set()
    kept_rows = [r for r in rows_in if r["image_id"] not in bad]
    jio.atomic_write_jsonl(out_path, kept_rows)
    kept = {i: c for i, c in caps.items() if i not in bad}
    table = [score_variant(caps, refs, "all", n_resamples, seed)]
    if kept:
        table.append(score_variant(kept, refs, "kept (drop " + ", ".join(drop) + ")", n_resamples, seed))
    df = pd.DataFrame(table)
    df["coverage"] = df["n_images"] / max(len(caps), 1)
    return df


def compact(table: Any) -> Any:
    """The table with each CI folded into its value (``1.99 [1.69, 2.32]``, rates in %), for display."""
    import pandas as pd

    out = pd.DataFrame(index=table.index)
    for col in table.columns:
        if col.endswith(("_lo", "_hi")):
            continue
        if f"{col}_lo" in table.columns:
            pct = col != "CIDEr"
            fmt = (lambda v: f"{100 * v:.1f}") if pct else (lambda v: f"{v:.2f}")
            out[col + (" %" if pct else "")] = [f"{fmt(v)} [{fmt(lo)}, {fmt(hi)}]" for v, lo, hi in
                                                 zip(table[col], table[f"{col}_lo"], table[f"{col}_hi"])]
        else:
            out[col] = table[col]
    return out
