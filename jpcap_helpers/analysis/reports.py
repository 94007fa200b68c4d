"""Tables and figures shown by the notebooks (and written under the run's ``reports/``).

Japanese text renders through IPAexGothic, shipped by the ``matplotlib-fontja`` package, so plots show
no tofu boxes in Colab, Jupyter or headless runs alike.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Iterable, Optional, Sequence

import matplotlib
import matplotlib.pyplot as plt

JAPANESE_FONT = "IPAexGothic"


def use_japanese_font() -> str:
    """Register the bundled Japanese font with matplotlib and make it the default; returns its path."""
    import matplotlib_fontja  # noqa: F401  (registers IPAexGothic and sets rcParams)
    from matplotlib import font_manager

    path = font_manager.findfont(font_manager.FontProperties(family=JAPANESE_FONT), fallback_to_default=False)
    matplotlib.rcParams["font.family"] = [JAPANESE_FONT, "sans-serif"]
    matplotlib.rcParams["axes.unicode_minus"] = False
    return path


use_japanese_font()


def markdown_table(df, floatfmt: str = ".4g") -> str:
    """A GitHub Markdown table of a DataFrame (no extra dependency); ``|`` in cells escaped."""
    import math

    def cell(v) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return ""
        if isinstance(v, float):
            return str(int(v)) if v.is_integer() and abs(v) < 1e15 else format(v, floatfmt)
        return str(v).replace("|", "\\|").replace("\n", " ")

    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(cell(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def save_figure(fig, path: str | Path) -> Path:
    """Save ``fig`` as PNG (atomically: temp name then rename)."""
    import os

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)
    return path


def image_grid(items: Sequence[tuple[str | Path, str]], ncols: int = 4, width: float = 3.2,
               title: Optional[str] = None):
    """A grid of images, each with its (Japanese) caption underneath; items are (path, caption)."""
    import textwrap

    from PIL import Image

    n = len(items)
    nrows = max(1, -(-n // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * width, nrows * (width + 0.9)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (path, caption) in zip(axes.flat, items):
        with Image.open(path) as im:
            ax.imshow(im.convert("RGB"))
        ax.set_title("\n".join(textwrap.wrap(caption, 16)), fontsize=9, loc="left")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def length_histograms(lengths: dict[str, Sequence[int]], xlabel: str, title: str):
    """Overlaid histograms of caption lengths per split."""
    import seaborn as sns

    fig, ax = plt.subplots(figsize=(7, 3.2))
    for split, values in lengths.items():
        if len(values):
            sns.histplot(list(values), ax=ax, label=split, discrete=True, stat="density", alpha=0.45,
                         element="step")
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig


def top_words(token_lists: Iterable[Sequence[str]], n: int = 20):
    """DataFrame of the ``n`` most frequent tokens."""
    import pandas as pd

    counts = Counter(t for toks in token_lists for t in toks)
    return pd.DataFrame(counts.most_common(n), columns=["word", "count"])


def bar_chart_with_ci(df, x: str, y: str, lo: str, hi: str, hue: Optional[str] = None, title: str = ""):
    """Bars of ``y`` per ``x`` (and ``hue``) with asymmetric CI error bars from columns lo/hi."""
    import numpy as np

    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(df)), 3.6))
    groups = [None] if hue is None else list(dict.fromkeys(df[hue]))
    xs = list(dict.fromkeys(df[x]))
    width = 0.8 / len(groups)
    for gi, g in enumerate(groups):
        sub = df if g is None else df[df[hue] == g]
        pos = [xs.index(v) + gi * width - 0.4 + width / 2 for v in sub[x]]
        err = np.vstack([sub[y] - sub[lo], sub[hi] - sub[y]]).clip(min=0)
        ax.bar(pos, sub[y], width=width, yerr=err, capsize=3, label=None if g is None else str(g))
    ax.set_xticks(range(len(xs)))
    ax.set_xticklabels(xs, rotation=20, ha="right")
    ax.set_ylabel(y)
    ax.set_title(title)
    if hue is not None:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def line_curves(df, x: str, ys: Sequence[str], title: str = ""):
    """Training curves: one subplot per column in ``ys`` against ``x`` (NaNs skipped)."""
    fig, axes = plt.subplots(1, len(ys), figsize=(4.2 * len(ys), 3.0), squeeze=False)
    for ax, col in zip(axes.flat, ys):
        sub = df[[x, col]].dropna()
        ax.plot(sub[x], sub[col], marker="o" if len(sub) < 30 else None)
        ax.set_xlabel(x)
        ax.set_title(col)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


# ---- ablations and failure cases (issue 7)

def _axis_order(values) -> list:
    """Axis values in plot order: numbers ascending, then strings (``'all'`` last among them)."""
    import numbers

    uniq = list(dict.fromkeys(values))
    nums = sorted(v for v in uniq if isinstance(v, numbers.Real) and not isinstance(v, bool))
    rest = [v for v in uniq if v not in nums]
    return nums + sorted(rest, key=lambda v: (str(v) == "all", str(v)))


def ablation_axis_figure(table, metrics: Sequence[str] = ("BLEU-4", "ROUGE-L", "CIDEr"),
                         axes: Sequence[str] = ("lora_rank", "top_k_layers", "projector", "model"),
                         base: Optional[dict] = None, title: str = "Ablations: each metric against each axis"):
    """A grid (rows = metrics, columns = axes) of metric ± CI (columns ``<m>_lo``/``<m>_hi``) against
    each axis, one series per split. With ``base`` each column shows the runs whose other axes keep
    their base values (the one-factor slice through the base); the base value is marked ``*``. A value
    that is a path (a local model folder) is labelled with its last part."""
    import numpy as np
    import seaborn as sns

    splits = list(dict.fromkeys(table["split"]))
    palette = sns.color_palette("colorblind", max(len(splits), 1))
    fig, grid = plt.subplots(len(metrics), len(axes), figsize=(3.7 * len(axes), 2.7 * len(metrics)),
                             squeeze=False)
    for j, axis in enumerate(axes):
        sub = table
        if base is not None:
            for other in axes:
                if other != axis:
                    sub = sub[sub[other].astype(str) == str(base[other])]
        values = _axis_order(sub[axis]) if len(sub) else []
        for i, metric in enumerate(metrics):
            ax = grid[i][j]
            for k, split in enumerate(splits):
                s = sub[sub["split"] == split]
                if not len(s):
                    continue
                offset = (k - (len(splits) - 1) / 2) * 0.08
                order = sorted(range(len(s)), key=lambda r: values.index(s[axis].iloc[r]))
                xs = np.array([values.index(s[axis].iloc[r]) + offset for r in order])
                y = np.array([s[metric].iloc[r] for r in order], dtype=float)
                lo = np.array([s.get(f"{metric}_lo", s[metric]).iloc[r] for r in order], dtype=float)
                hi = np.array([s.get(f"{metric}_hi", s[metric]).iloc[r] for r in order], dtype=float)
                err = np.nan_to_num(np.vstack([y - lo, hi - y]), nan=0.0).clip(min=0)
                ax.errorbar(xs, y, yerr=err, fmt="o-", capsize=3, color=palette[k], label=str(split), lw=1.2)
            ax.set_xticks(range(len(values)))
            marks = [str(v).rstrip("/").rsplit("/", 1)[-1] for v in values]
            marks = [f"{m}*" if base is not None and str(v) == str(base[axis]) else m for m, v in zip(marks, values)]
            long = max((len(m) for m in marks), default=0) > 10
            ax.set_xticklabels(marks, rotation=20 if long else 0, ha="right" if long else "center",
                               fontsize=7 if long else None)
            ax.set_xlim(-0.5, max(len(values) - 0.5, 0.5))
            if i == len(metrics) - 1:
                ax.set_xlabel(axis + ("" if len(values) > 1 else " (not varied)"))
            if j == 0:
                ax.set_ylabel(metric)
            if i == 0 and j == 0 and splits:
                ax.legend(fontsize=8, title="split", title_fontsize=8)
            sns.despine(ax=ax)
    fig.suptitle(title + (" (* = base value)" if base is not None else ""))
    fig.tight_layout()
    return fig


def ablation_cost_figure(costs, title: str = "Cost of each sweep run"):
    """Bars per run: trainable parameters (millions), peak memory (GiB, with what was measured) and
    training time (s); the base run hatched."""
    import seaborn as sns

    panels = [("trainable_params", "trainable parameters (M)", 1e-6), ("peak_memory_gib", "peak memory (GiB)", 1.0),
              ("train_seconds", "training time (s)", 1.0)]
    fig, axs = plt.subplots(1, 3, figsize=(max(10, 1.1 * len(costs) * 3), 3.4), squeeze=False)
    color = sns.color_palette("colorblind", 1)[0]
    labels = list(costs["label"])
    for ax, (col, name, scale) in zip(axs[0], panels):
        known = [v is not None and v == v for v in costs[col]]
        values = [float(v) * scale if k else 0.0 for v, k in zip(costs[col], known)]
        bars = ax.bar(range(len(values)), values, color=color)
        for x, k in enumerate(known):
            if not k:
                ax.annotate("n/a", (x, 0), ha="center", va="bottom", fontsize=8, color="grey")
        for bar, is_base in zip(bars, costs["base"]):
            if is_base:
                bar.set_hatch("//")
                bar.set_edgecolor("black")
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=25, ha="right", fontsize=8)
        sub = name
        if col == "peak_memory_gib":
            kinds = [k for k in dict.fromkeys(costs.get("peak_memory_kind", [])) if k]
            if kinds:
                sub += "\n" + "; ".join(k[:40] for k in kinds[:2])
        ax.set_title(sub, fontsize=9)
        sns.despine(ax=ax)
    fig.suptitle(title + " (hatched = base)")
    fig.tight_layout()
    return fig


def paired_difference_figure(paired, metrics: Sequence[str] = ("BLEU-4", "ROUGE-L", "CIDEr"),
                             title: str = "Difference from the base setting (paired bootstrap, 95% CI)"):
    """Per metric: each run's difference from the base run (dot) with its paired-bootstrap CI, per
    split; a vertical line at 0; p-values written next to the dots."""
    import numpy as np
    import seaborn as sns

    data = paired[paired["difference"].notna()]
    splits = list(dict.fromkeys(data["split"]))
    labels = list(dict.fromkeys(data["label"]))
    palette = sns.color_palette("colorblind", max(len(splits), 1))
    fig, axs = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 0.55 * max(len(labels), 1) + 1.8),
                            squeeze=False)
    for ax, metric in zip(axs[0], metrics):
        sub = data[data["metric"] == metric]
        for k, split in enumerate(splits):
            s = sub[sub["split"] == split]
            ys = np.array([labels.index(v) for v in s["label"]]) + (k - (len(splits) - 1) / 2) * 0.18
            d = s["difference"].to_numpy(dtype=float)
            err = np.vstack([d - s["ci_low"].to_numpy(dtype=float), s["ci_high"].to_numpy(dtype=float) - d]).clip(min=0)
            ax.errorbar(d, ys, xerr=err, fmt="o", capsize=3, color=palette[k], label=str(split))
            for x, y, p in zip(d, ys, s["p_value"]):
                ax.annotate(f"p={p:.3f}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.axvline(0, color="grey", lw=0.8, ls="--")
        ax.set_yticks(range(len(labels)))
        ax.set_yticklabels(labels, fontsize=8)
        ax.set_title(f"Δ {metric}")
        sns.despine(ax=ax)
    if splits:
        axs[0][0].legend(fontsize=8, title="split", title_fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def flag_rates_chart(rates, flags: Sequence[str] = ("hallucination", "gendered", "non_japanese", "repetition",
                                                     "empty", "overlong"), title: str = "Automatic flags per model"):
    """Grouped bars: share of images (%) with each flag, one colour per model (``flags.flag_rates``)."""
    import pandas as pd
    import seaborn as sns

    long = pd.DataFrame([{"flag": f, "model": r["model"], "percent": 100 * float(r[f])}
                         for _, r in rates.iterrows() for f in flags])
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(flags)), 3.4))
    if len(long):
        sns.barplot(data=long, x="flag", y="percent", hue="model", ax=ax, palette="colorblind")
        for container in ax.containers:
            ax.bar_label(container, fmt="%.0f", fontsize=7)
    ax.set_ylabel("% of images")
    ax.set_xlabel("")
    ax.set_title(title)
    ax.legend(fontsize=8)
    sns.despine(ax=ax)
    fig.tight_layout()
    return fig
