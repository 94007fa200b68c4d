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
