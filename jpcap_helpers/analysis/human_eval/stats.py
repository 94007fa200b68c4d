"""Statistics of human judgements: win rates with bootstrap CIs (resampling items), inter-rater
agreement (Cohen's κ for two raters, Fleiss' κ for more) and Spearman's ρ between human scores and
per-image CIDEr. Numpy only (no scipy in the environment). Small samples give wide intervals and κ on
a few items is unstable: the report says how many items each number rests on."""
from __future__ import annotations

import math
from itertools import combinations
from typing import Any, Sequence

import numpy as np

from .sampling import Sample
from .storage import load_ratings

__all__ = ["winner", "win_rates", "cohen_kappa", "fleiss_kappa", "agreement", "spearman", "score_correlations",
           "human_eval_report"]


def winner(row: Any) -> str:
    """The system a judgement prefers, or ``"tie"``."""
    pref = row["preference"]
    return "tie" if pref == "tie" else row[pref]


def _bootstrap_items(groups: list[np.ndarray], stat, n_resamples: int, seed: int, level: float) -> list[float]:
    """Percentile CI of ``stat`` over item resamples (``groups``: per item, an array of values)."""
    if not groups:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    reps = []
    for _ in range(n_resamples):
        pick = rng.integers(0, len(groups), len(groups))
        reps.append(stat(np.concatenate([groups[i] for i in pick])))
    tail = (1 - level) / 2 * 100
    reps = np.asarray(reps, dtype=float)
    reps = reps[~np.isnan(reps)]
    return [float(v) for v in np.percentile(reps, [tail, 100 - tail])] if len(reps) else [float("nan")] * 2


def win_rates(df: Any, systems: Sequence[str], n_resamples: int = 2000, seed: int = 0, level: float = 0.95):
    """Per system (and ``tie``): judgements won (ties separate), the share of all judgements and its
    percentile bootstrap CI over items (all judgements of a resampled item move together)."""
    import pandas as pd

    if not len(df):
        return pd.DataFrame(columns=["outcome", "n", "share", "ci_lo", "ci_hi", "n_items", "n_judgements"])
    w = df.apply(winner, axis=1)
    rows = []
    for outcome in (*systems, "tie"):
        hits = (w == outcome).to_numpy(dtype=float)
        groups = [hits[(df["item_id"] == i).to_numpy()] for i in df["item_id"].unique()]
        lo, hi = _bootstrap_items(groups, np.mean, n_resamples, seed, level)
        rows.append({"outcome": outcome, "n": int(hits.sum()), "share": float(hits.mean()), "ci_lo": lo, "ci_hi": hi,
                     "n_items": int(df["item_id"].nunique()), "n_judgements": len(df)})
    return pd.DataFrame(rows)


def cohen_kappa(a: Sequence[Any], b: Sequence[Any]) -> float:
    """Cohen's κ of two raters' labels on the same items (nan when undefined: no items, or both raters
    always give one and the same label)."""
    if len(a) != len(b):
        raise ValueError(f"two raters' labels must pair up item by item ({len(a)} vs {len(b)})")
    n = len(a)
    if n == 0:
        return float("nan")
    labels = sorted(set(a) | set(b), key=str)
    p_o = sum(x == y for x, y in zip(a, b)) / n
    p_e = sum((list(a).count(k) / n) * (list(b).count(k) / n) for k in labels)
    return float("nan") if math.isclose(p_e, 1.0) else (p_o - p_e) / (1 - p_e)


def fleiss_kappa(counts: Any) -> float:
    """Fleiss' κ from an (items × categories) table of how many raters chose each category; every
    item needs the same number of raters (≥ 2). nan when undefined."""
    table = np.asarray(counts, dtype=float)
    if table.ndim != 2 or table.shape[0] == 0:
        return float("nan")
    m = table.sum(1)
    if not np.all(m == m[0]) or m[0] < 2:
        raise ValueError("Fleiss' κ needs the same number (≥ 2) of raters for every item")
    n_items, k = table.shape[0], m[0]
    p_j = table.sum(0) / (n_items * k)
    p_i = ((table ** 2).sum(1) - k) / (k * (k - 1))
    p_bar, p_e = p_i.mean(), (p_j ** 2).sum()
    return float("nan") if math.isclose(p_e, 1.0) else float((p_bar - p_e) / (1 - p_e))


def agreement(df: Any) -> dict:
    """Agreement on the preferred system (or tie) over the items every rater judged: Cohen's κ for two
    raters, Fleiss' κ for more (with the mean pairwise Cohen's κ); ``n_items`` it rests on."""
    raters = sorted(df["rater"].unique()) if len(df) else []
    out: dict[str, Any] = {"n_raters": len(raters), "n_items": 0, "measure": None, "kappa": float("nan")}
    if len(raters) < 2:
        return out
    labels = {r: dict(zip(sub["item_id"], sub.apply(winner, axis=1))) for r, sub in df.groupby("rater")}
    common = sorted(set.intersection(*(set(v) for v in labels.values())))
    out["n_items"] = len(common)
    pairwise = [cohen_kappa([labels[a][i] for i in common], [labels[b][i] for i in common])
                for a, b in combinations(raters, 2)]
    if len(raters) == 2:
        out.update(measure="Cohen's κ", kappa=pairwise[0])
    else:
        cats = sorted({labels[r][i] for r in raters for i in common}, key=str)
        table = [[sum(labels[r][i] == c for r in raters) for c in cats] for i in common]
        out.update(measure="Fleiss' κ", kappa=fleiss_kappa(table) if common else float("nan"),
                   mean_pairwise_cohen=_nanmean(pairwise))
    return out


def _nanmean(values: Sequence[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return float(np.mean(kept)) if kept else float("nan")


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):   # average ranks of ties
        tie = x == v
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's ρ (Pearson correlation of average ranks); nan with < 3 pairs or a constant side."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) != len(y):
        raise ValueError("x and y must pair up")
    if len(x) < 3:
        return float("nan")
    rx, ry = _ranks(x), _ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def score_correlations(df: Any, sample: Sample, n_resamples: int = 2000, seed: int = 0, level: float = 0.95):
    """Spearman ρ between per-image CIDEr and the raters' mean adequacy / fluency of the same caption
    (one point per item × system with a CIDEr score), with a bootstrap CI over items."""
    import pandas as pd

    points: list[tuple[str, float, float, float]] = []
    for item_id, sub in df.groupby("item_id"):
        item = sample.item(item_id)
        for system in sample.systems:
            cider = (item.get("cider") or {}).get(system)
            if cider is None:
                continue
            sides = ["left" if r.left == system else "right" for r in sub.itertuples()]
            ade = np.mean([getattr(r, f"adequacy_{s}") for r, s in zip(sub.itertuples(), sides)])
            flu = np.mean([getattr(r, f"fluency_{s}") for r, s in zip(sub.itertuples(), sides)])
            points.append((item_id, float(cider), float(ade), float(flu)))
    rows = []
    for name, col in (("adequacy", 2), ("fluency", 3)):
        xs = np.array([p[1] for p in points])
        ys = np.array([p[col] for p in points])
        rho = spearman(xs, ys)
        ids = [p[0] for p in points]
        uniq = sorted(set(ids))
        rng = np.random.default_rng(seed)
        reps = []
        for _ in range(n_resamples if len(uniq) >= 3 else 0):
            pick = rng.choice(len(uniq), len(uniq))
            idx = np.concatenate([[j for j, i in enumerate(ids) if i == uniq[k]] for k in pick]).astype(int)
            reps.append(spearman(xs[idx], ys[idx]))
        reps = np.asarray(reps)
        reps = reps[~np.isnan(reps)]
        tail = (1 - level) / 2 * 100
        lo, hi = (np.percentile(reps, [tail, 100 - tail]) if len(reps) else [float("nan")] * 2)
        rows.append({"human_score": name, "spearman_rho": rho, "ci_lo": float(lo), "ci_hi": float(hi),
                     "n_points": len(points), "n_items": len(uniq)})
    return pd.DataFrame(rows)


def human_eval_report(sample: Sample, ratings_dir: Any, n_resamples: int = 2000, seed: int = 0,
                      level: float = 0.95, quiet: bool = False) -> dict:
    """Everything 06 shows: ``ratings`` (DataFrame), ``load`` (:class:`LoadReport`), ``win_rates``,
    ``agreement``, ``correlations``, ``flags`` (share of judgements flagging each system's caption)
    and ``text`` (markdown; says so plainly when there are no ratings yet)."""
    df, load = load_ratings(ratings_dir, sample, quiet=quiet)
    out: dict[str, Any] = {"ratings": df, "load": load}
    if not len(df):
        out["text"] = (f"**No ratings yet** for sample `{sample.sample_id}` in `{ratings_dir}` "
                       f"({len(sample.items)} items to rate): nothing to compute. Rate with the widget or the "
                       "HTML form, then re-run this cell.")
        return out
    out["win_rates"] = win_rates(df, sample.systems, n_resamples, seed, level)
    out["agreement"] = agreement(df)
    out["correlations"] = score_correlations(df, sample, n_resamples, seed, level)
    flag_rows = []
    for system in sample.systems:
        lists = [r.flags_left if r.left == system else r.flags_right for r in df.itertuples()]
        flag_rows.append({"system": system, **{f: float(np.mean([f in v for v in lists])) for f in
                                               ("hallucination", "bias", "privacy")}})
    import pandas as pd

    out["flags"] = pd.DataFrame(flag_rows)
    a = out["agreement"]
    wr = out["win_rates"]
    lines = [f"**{len(df)} judgements** of {df['item_id'].nunique()} / {len(sample.items)} items by "
             f"{df['rater'].nunique()} rater(s) (sample `{sample.sample_id}`).",
             "Preferred: " + "; ".join(f"{r.outcome} {100 * r.share:.0f}% [{100 * r.ci_lo:.0f}, {100 * r.ci_hi:.0f}]"
                                       for r in wr.itertuples()) + f" ({int(level * 100)}% bootstrap CI over items)."]
    if a["measure"]:
        lines.append(f"Agreement: {a['measure']} = {a['kappa']:.2f} on {a['n_items']} items every rater judged"
                     + (" — too few items for a stable κ (read it as a rough hint)." if a["n_items"] < 30 else "."))
    else:
        lines.append("Agreement: needs at least two raters on the same items.")
    for r in out["correlations"].itertuples():
        lines.append(f"Spearman ρ(CIDEr, {r.human_score}) = {r.spearman_rho:.2f} [{r.ci_lo:.2f}, {r.ci_hi:.2f}] "
                     f"over {r.n_points} captions of {r.n_items} items.")
    out["text"] = "\n\n".join(lines)
    return out
