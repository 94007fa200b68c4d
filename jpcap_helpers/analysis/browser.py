"""Failure-case browser: an ipywidgets view over one or more prediction files, and its static HTML
export (docs/ablations.md).

Each item is one image: the image, every model's prediction side by side with its per-image scores
(from ``<run>/scores/<system>__<split>.json``) and automatic flags (:mod:`jpcap_helpers.analysis.flags`), and
the references. Controls: focus model (whose CIDEr and flags drive sorting and filtering, or any
model), flag filter, CIDEr range, sort order, models shown, page size and page. Core ipywidgets only
(Colab and Jupyter); the widget and :meth:`FailureBrowser.export_html` render the same HTML blocks,
so the export is the view for places where widgets do not render. Tests drive the class headless.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from ..evaluate import prediction_files
from ..io import atomic_write_text, read_jsonl
from . import flags as jflags
from .sweeps import DONE_MARKER, setting_label, sweep_runs

__all__ = ["PredictionSource", "prediction_sources", "load_items", "FailureBrowser", "item_html",
           "ANY_MODEL", "FLAG_FILTERS", "SORTS", "SCORE_KEYS", "EXPORT_MAX_ITEMS"]

ANY_MODEL = "(any model)"
SCORE_KEYS = ("CIDEr", "BLEU-4", "ROUGE-L")
FLAG_FILTERS = {"(all images)": None, "(any flag)": "__any__", "(no flag)": "__none__",
                **{jflags.FLAG_LABELS[f]: f for f in jflags.FLAGS}}
SORTS = {"CIDEr ascending (worst first)": "cider_asc", "CIDEr descending": "cider_desc",
         "CIDEr gap between models": "gap", "most flags": "n_flags", "image id": "image_id"}
THUMB = 224
EXPORT_MAX_ITEMS = 500   # images in a static export at most (the page stays a few MiB)


@dataclass
class PredictionSource:
    """One model's predictions on a split: label shown, predictions JSONL, per-image scores JSON."""
    label: str
    predictions: Path
    scores: Optional[Path] = None
    finetuned: bool = False


def _is_finetuned(system: str, pred_path: Path) -> bool:
    """A fine-tuned system: ``<model>+ft`` (or ``_ft`` once sanitised), or an adapter in its meta.json."""
    if "+" in system or system.endswith("_ft"):
        return True
    meta = Path(pred_path).with_suffix(".meta.json")
    try:
        return bool(json.loads(meta.read_text(encoding="utf-8")).get("adapter"))
    except (OSError, ValueError):
        return False


def prediction_sources(params, split: str = "test", include_sweep: bool = False,
                       systems: Optional[Sequence[str]] = None) -> list[PredictionSource]:
    """The run's ``predictions/<system>__<split>.jsonl`` (zero-shot first, then fine-tuned), and with
    ``include_sweep`` every finished sweep run's, labelled ``<setting>:<system>``."""
    def of_run(run_dir: Path, prefix: str = "") -> list[PredictionSource]:
        found = [(sys_, p, _is_finetuned(sys_, p)) for sys_, sp, p in prediction_files(run_dir) if sp == split]
        found.sort(key=lambda t: (t[2], t[0]))     # zero-shot first, then fine-tuned
        return [PredictionSource(prefix + sys_, p, run_dir / "scores" / f"{sys_}__{split}.json", ft)
                for sys_, p, ft in found if systems is None or sys_ in systems]

    out = of_run(Path(params.run_dir))
    if include_sweep:
        for rp, setting, _ in sweep_runs(params):
            if (Path(rp.run_dir) / DONE_MARKER).exists():
                out += of_run(Path(rp.run_dir), prefix=setting_label(setting, params.model.name) + ":")
    return out


def _per_image_scores(path: Optional[Path]) -> dict[int, dict[str, float]]:
    if path is None or not Path(path).exists():
        return {}
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return {int(r["image_id"]): {k: float(r[k]) for k in SCORE_KEYS if k in r} for r in data.get("per_image", [])}


def load_items(sources: Sequence[PredictionSource], references_path: str | Path,
               images_dir: str | Path) -> tuple[list[dict], Any]:
    """(items, flags DataFrame): one item per image of the references file that some source
    predicted, in reference-file order: ``{image_id, file_name, image_path, references, models:
    {label: {caption, error, scores, flags, detail}}}``."""
    import pandas as pd

    refs_rows = list(read_jsonl(references_path))
    refs = {int(r["image_id"]): r for r in refs_rows}
    items: dict[int, dict] = {}
    frames = []
    for src in sources:
        preds: dict[int, str] = {}
        errors: dict[int, str] = {}
        for row in read_jsonl(src.predictions, tolerate_partial_last=True):
            iid = row.get("image_id")
            if iid not in refs:
                continue
            preds[iid] = row.get("caption") or ""
            if row.get("error"):
                errors[iid] = str(row["error"])
        scores = _per_image_scores(src.scores)
        fl = jflags.flag_predictions(preds, {i: refs[i]["captions"] for i in preds}, model=src.label)
        frames.append(fl)
        by_id = {int(r.image_id): r for r in fl.itertuples(index=False)}
        for iid, caption in preds.items():
            ref = refs[iid]
            item = items.setdefault(iid, {
                "image_id": iid, "file_name": ref.get("file_name", ""),
                "image_path": str(Path(images_dir) / ref.get("file_name", "")),
                "references": list(ref.get("captions") or []), "models": {}})
            f = by_id.get(iid)
            item["models"][src.label] = {
                "caption": caption, "error": errors.get(iid, ""), "scores": scores.get(iid, {}),
                "flags": list(f.flags) if f is not None else [],
                "detail": {"hallucinated_nouns": list(f.hallucinated_nouns), "gender_terms": list(f.gender_terms),
                           "gender_reason": f.gender_reason, "script": f.script, "repeated": f.repeated,
                           "n_tokens": int(f.n_tokens), "max_ref_tokens": int(f.max_ref_tokens)} if f is not None else {},
            }
    order = [int(r["image_id"]) for r in refs_rows if int(r["image_id"]) in items]
    flags_df = pd.concat(frames, ignore_index=True) if frames else jflags.flag_predictions({}, {})
    return [items[i] for i in order], flags_df


# ---------------------------------------------------------------------------------------------
# HTML (shared by the widget and the export)
# ---------------------------------------------------------------------------------------------

STYLE = """
.jpfb{font-family:'Noto Sans JP','Hiragino Sans','IPAexGothic','Yu Gothic',sans-serif;font-size:13px}
.jpfb-item{display:flex;gap:12px;border-top:1px solid #ccc;padding:10px 0;align-items:flex-start}
.jpfb-img{flex:0 0 auto;width:230px;text-align:center;font-size:11px;color:#555}
.jpfb-img img{max-width:224px;max-height:224px;border:1px solid #ddd}
.jpfb-body{flex:1 1 auto;min-width:0}
.jpfb-models{display:flex;gap:8px;flex-wrap:wrap}
.jpfb-card{flex:1 1 180px;border:1px solid #ddd;border-radius:4px;padding:6px;background:#fafafa}
.jpfb-card h4{margin:0 0 4px 0;font-size:12px;color:#333}
.jpfb-cap{font-size:14px;margin:2px 0 4px 0;word-break:break-all}
.jpfb-scores{font-size:11px;color:#444}
.jpfb-flag{display:inline-block;background:#c0392b;color:#fff;border-radius:3px;padding:0 4px;margin:2px 2px 0 0;font-size:11px}
.jpfb-detail{font-size:11px;color:#7a2a1f}
.jpfb-refs{font-size:12px;margin:6px 0 0 0;padding-left:18px;color:#333}
.jpfb-missing{color:#999}
"""


def _thumbnail_uri(path: str | Path, size: int = THUMB, cache: Optional[dict] = None) -> Optional[str]:
    """The image as a ``data:image/jpeg;base64`` thumbnail (EXIF rotation applied), or None."""
    key = (str(path), size)
    if cache is not None and key in cache:
        return cache[key]
    uri = None
    try:
        from PIL import Image, ImageOps

        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=82)
        uri = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    except (OSError, ValueError):
        uri = None
    if cache is not None:
        cache[key] = uri
    return uri


def _fmt(v: Any) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def item_html(item: dict, models: Sequence[str], thumb_cache: Optional[dict] = None) -> str:
    """One image's block: thumbnail, one card per model (prediction, scores, flags), references.
    Every text is HTML-escaped."""
    e = html.escape
    uri = _thumbnail_uri(item["image_path"], cache=thumb_cache)
    img = (f'<img src="{uri}" alt="image {item["image_id"]}">' if uri
           else '<div class="jpfb-missing">(image not found)</div>')
    cards = []
    for m in models:
        info = item["models"].get(m)
        if info is None:
            cards.append(f'<div class="jpfb-card"><h4>{e(m)}</h4><div class="jpfb-missing">(no prediction)</div></div>')
            continue
        cap = e(info["caption"]) if info["caption"] else '<span class="jpfb-missing">(empty)</span>'
        if info.get("error"):
            cap += f'<div class="jpfb-detail">error: {e(info["error"])}</div>'
        scores = " · ".join(f"{k} {_fmt(info['scores'].get(k))}" for k in SCORE_KEYS) if info["scores"] else "no per-image scores"
        badges = "".join(f'<span class="jpfb-flag">{e(jflags.FLAG_LABELS.get(f, f))}</span>' for f in info["flags"])
        d = info.get("detail") or {}
        details = []
        if d.get("hallucinated_nouns"):
            details.append("nouns not in refs: " + "、".join(d["hallucinated_nouns"]))
        if "gendered" in info["flags"]:
            details.append(f"gender: {'、'.join(d.get('gender_terms', []))} ({d.get('gender_reason', '')})")
        if d.get("repeated"):
            details.append(f"loop: {d['repeated']}")
        if "non_japanese" in info["flags"]:
            details.append(f"script: {d.get('script', '')}")
        if "overlong" in info["flags"]:
            details.append(f"{d.get('n_tokens')} tokens > 2 × {d.get('max_ref_tokens')}")
        detail = "".join(f'<div class="jpfb-detail">{e(x)}</div>' for x in details)
        cards.append(f'<div class="jpfb-card"><h4>{e(m)}</h4><div class="jpfb-cap" lang="ja">{cap}</div>'
                     f'<div class="jpfb-scores">{e(scores)}</div>{badges}{detail}</div>')
    refs = "".join(f'<li lang="ja">{e(r)}</li>' for r in item["references"])
    return (f'<section class="jpfb-item" data-image-id="{item["image_id"]}">'
            f'<div class="jpfb-img">{img}<div>id {item["image_id"]} · {e(item["file_name"])}</div></div>'
            f'<div class="jpfb-body"><div class="jpfb-models">{"".join(cards)}</div>'
            f'<ol class="jpfb-refs" title="references">{refs}</ol></div></section>')


# ---------------------------------------------------------------------------------------------
# the browser
# ---------------------------------------------------------------------------------------------

class FailureBrowser:
    """Browse failure cases of one or more models: filter, sort, page; :meth:`export_html` writes
    the same view as a static page.

    Headless use (tests): set the widgets' ``value`` (``w_model``, ``w_flag``, ``w_cider``,
    ``w_sort``, ``w_models``, ``w_page_size``, ``w_page``) or call :meth:`set`, then read
    :meth:`filtered_items`, :meth:`page_items` or :attr:`html`.
    """

    def __init__(self, items: Sequence[dict], flags_df=None, page_size: int = 5, title: str = "Failure cases",
                 focus: Optional[str] = None):
        import ipywidgets as w

        self.items = list(items)
        self.flags = flags_df
        self.title = title
        self.models = list(dict.fromkeys(m for it in self.items for m in it["models"]))
        self._thumbs: dict = {}
        max_cider = max([s for it in self.items for s in self._ciders(it).values()] + [1.0])
        self.cider_span = (0.0, float(math.ceil(max_cider * 100) / 100))
        default_model = focus if focus in self.models else next(
            (m for m in self.models if "+" in m), self.models[0] if self.models else ANY_MODEL)
        self.w_model = w.Dropdown(options=self.models + [ANY_MODEL], value=default_model, description="model")
        self.w_flag = w.Dropdown(options=list(FLAG_FILTERS), value="(all images)", description="flag")
        self.w_cider = w.FloatRangeSlider(value=self.cider_span, min=self.cider_span[0], max=self.cider_span[1],
                                          step=0.01, description="CIDEr", readout_format=".2f")
        self.w_sort = w.Dropdown(options=list(SORTS), value="CIDEr ascending (worst first)", description="sort")
        self.w_models = w.SelectMultiple(options=self.models, value=tuple(self.models), description="show",
                                         rows=min(max(len(self.models), 2), 6))
        self.w_page_size = w.Dropdown(options=[3, 5, 10, 20, 50], value=page_size if page_size in (3, 5, 10, 20, 50) else 5,
                                      description="per page")
        self.w_page = w.BoundedIntText(value=1, min=1, max=1, description="page")
        self.w_prev = w.Button(description="◀", layout=w.Layout(width="40px"))
        self.w_next = w.Button(description="▶", layout=w.Layout(width="40px"))
        self.w_status = w.HTML()
        self.w_items = w.HTML()
        self.w_prev.on_click(lambda _: self._step(-1))
        self.w_next.on_click(lambda _: self._step(+1))
        for ctl in (self.w_model, self.w_flag, self.w_cider, self.w_sort, self.w_page_size):
            ctl.observe(self._on_filter, names="value")
        self.w_models.observe(lambda _: self._render(), names="value")
        self.w_page.observe(lambda _: self._render(), names="value")
        self.widget = w.VBox([
            w.HTML(f"<b>{html.escape(title)}</b>"),
            w.HBox([self.w_model, self.w_flag, self.w_sort]),
            w.HBox([self.w_cider, self.w_page_size, self.w_models]),
            w.HBox([self.w_prev, self.w_page, self.w_next, self.w_status]),
            self.w_items,
        ])
        self._filtered: list[dict] = []
        self._refilter()

    # ---- construction -----------------------------------------------------------------------
    @classmethod
    def from_sources(cls, sources: Sequence[PredictionSource], references_path: str | Path,
                     images_dir: str | Path, **kwargs) -> "FailureBrowser":
        """Load the sources; the focus defaults to the first fine-tuned source."""
        items, flags_df = load_items(sources, references_path, images_dir)
        kwargs.setdefault("focus", next((s.label for s in sources if s.finetuned), None))
        return cls(items, flags_df, **kwargs)

    @classmethod
    def from_run(cls, params, split: str = "test", include_sweep: bool = False, **kwargs) -> "FailureBrowser":
        """Every prediction file of the run on ``split`` (and, optionally, of its finished sweep runs)."""
        sources = prediction_sources(params, split, include_sweep=include_sweep)
        if not sources:
            raise FileNotFoundError(f"no predictions for split {split!r} in {Path(params.run_dir) / 'predictions'}: "
                                    "run 02_zero_shot / 03_qlora_train first")
        kwargs.setdefault("title", f"Failure cases · {params.run.name} · {split}")
        return cls.from_sources(sources, Path(params.processed_dir) / f"{split}.jsonl", params.images_dir, **kwargs)

    # ---- state ------------------------------------------------------------------------------
    def set(self, **values) -> "FailureBrowser":
        """Set controls by name: model, flag, cider (lo, hi), sort, models, page_size, page. Flag and
        sort accept their labels or their keys (``"repetition"``, ``"cider_desc"``)."""
        flag_keys = {v: k for k, v in FLAG_FILTERS.items() if v}
        sort_keys = {v: k for k, v in SORTS.items()}
        mapping = {"model": self.w_model, "flag": self.w_flag, "cider": self.w_cider, "sort": self.w_sort,
                   "models": self.w_models, "page_size": self.w_page_size, "page": self.w_page}
        for key in ("model", "flag", "cider", "sort", "models", "page_size", "page"):
            if key not in values:
                continue
            v = values.pop(key)
            if key == "flag":
                v = flag_keys.get(v, v)
            elif key == "sort":
                v = sort_keys.get(v, v)
            elif key == "models":
                v = tuple(v)
            elif key == "cider":
                v = (float(v[0]), float(v[1]))
            mapping[key].value = v
        if values:
            raise TypeError(f"unknown control(s): {', '.join(values)}")
        return self

    @staticmethod
    def _ciders(item: dict) -> dict[str, float]:
        return {m: info["scores"]["CIDEr"] for m, info in item["models"].items() if "CIDEr" in info["scores"]}

    def _focus(self, item: dict) -> tuple[Optional[float], set[str]]:
        """(CIDEr, flags) of the focus model; for any model: the lowest CIDEr and the union of flags."""
        m = self.w_model.value
        if m == ANY_MODEL:
            ciders = list(self._ciders(item).values())
            return (min(ciders) if ciders else None), {f for info in item["models"].values() for f in info["flags"]}
        info = item["models"].get(m)
        if info is None:
            return None, set()
        return info["scores"].get("CIDEr"), set(info["flags"])

    def _keep(self, item: dict) -> bool:
        m = self.w_model.value
        if m != ANY_MODEL and m not in item["models"]:
            return False
        cider, flags = self._focus(item)
        want = FLAG_FILTERS[self.w_flag.value]
        if want == "__any__" and not flags:
            return False
        if want == "__none__" and flags:
            return False
        if want not in (None, "__any__", "__none__") and want not in flags:
            return False
        lo, hi = self.w_cider.value
        full = lo <= self.cider_span[0] and hi >= self.cider_span[1]
        if cider is None:
            return full
        return full or (lo - 1e-9 <= cider <= hi + 1e-9)

    def _sort_key(self, item: dict):
        how = SORTS[self.w_sort.value]
        cider, flags = self._focus(item)
        missing = cider is None
        if how == "cider_asc":
            return (missing, cider if cider is not None else 0.0, item["image_id"])
        if how == "cider_desc":
            return (missing, -(cider if cider is not None else 0.0), item["image_id"])
        if how == "gap":
            c = list(self._ciders(item).values())
            return (len(c) < 2, -(max(c) - min(c)) if len(c) >= 2 else 0.0, item["image_id"])
        if how == "n_flags":
            return (-len(flags), item["image_id"])
        return (item["image_id"],)

    def _refilter(self) -> None:
        self._filtered = sorted((it for it in self.items if self._keep(it)), key=self._sort_key)
        n_pages = self.n_pages
        self.w_page.max = n_pages
        if self.w_page.value != 1:
            self.w_page.value = 1          # triggers _render
        else:
            self._render()

    def _on_filter(self, _change=None) -> None:
        self._refilter()

    def _step(self, delta: int) -> None:
        self.w_page.value = min(max(1, self.w_page.value + delta), self.n_pages)

    @property
    def n_pages(self) -> int:
        return max(1, math.ceil(len(self._filtered) / self.w_page_size.value))

    def filtered_items(self) -> list[dict]:
        """Every item passing the filters, in the current sort order."""
        return list(self._filtered)

    def page_items(self) -> list[dict]:
        """The items on the current page."""
        size = self.w_page_size.value
        start = (self.w_page.value - 1) * size
        return self._filtered[start:start + size]

    def shown_ids(self) -> list[int]:
        """Image ids on the current page, in display order."""
        return [it["image_id"] for it in self.page_items()]

    def shown_models(self) -> list[str]:
        return [m for m in self.models if m in self.w_models.value]

    # ---- rendering --------------------------------------------------------------------------
    def _status_text(self) -> str:
        return (f"page {self.w_page.value} / {self.n_pages} · {len(self._filtered)} of {len(self.items)} images "
                f"· model {self.w_model.value} · flag {self.w_flag.value} · CIDEr "
                f"{self.w_cider.value[0]:.2f}–{self.w_cider.value[1]:.2f} · {self.w_sort.value}")

    def blocks_html(self, items: Iterable[dict]) -> str:
        models = self.shown_models()
        return "".join(item_html(it, models, self._thumbs) for it in items)

    def _render(self) -> None:
        self.w_status.value = html.escape(self._status_text())
        body = self.blocks_html(self.page_items()) or "<p>No image matches these filters.</p>"
        self.w_items.value = f'<style>{STYLE}</style><div class="jpfb">{body}</div>'

    @property
    def html(self) -> str:
        """The current page's HTML (what the widget shows)."""
        return self.w_items.value

    def table(self, limit: Optional[int] = None):
        """The filtered items as a DataFrame: image_id, then per shown model its caption, CIDEr, flags."""
        import pandas as pd

        rows = []
        for it in self._filtered[:limit]:
            row: dict[str, Any] = {"image_id": it["image_id"]}
            for m in self.shown_models():
                info = it["models"].get(m, {})
                row[f"{m}: caption"] = info.get("caption", "")
                row[f"{m}: CIDEr"] = (info.get("scores") or {}).get("CIDEr")
                row[f"{m}: flags"] = ", ".join(info.get("flags", []))
            row["reference"] = it["references"][0] if it["references"] else ""
            rows.append(row)
        return pd.DataFrame(rows)

    def export_html(self, path: str | Path, max_items: Optional[int] = EXPORT_MAX_ITEMS, rates=None) -> Path:
        """Write the current view — every filtered item in sort order (not only the page), at most
        ``max_items`` — as one self-contained UTF-8 HTML page (images as base64 thumbnails, text
        escaped), atomically. ``rates`` (``flags.flag_rates``) adds the flag-rate table on top."""
        items = self._filtered if max_items is None else self._filtered[:max_items]
        e = html.escape
        head = (f"<p>{e(self._status_text().split(' · ', 1)[1])}. Exported {len(items)} image(s)"
                f"{' (capped)' if len(items) < len(self._filtered) else ''}. Flags are automatic "
                f"(docs/ablations.md): evidence to inspect, not verdicts.</p>")
        if rates is not None and len(rates):
            cols = ["model", "n_images", *jflags.FLAGS, "hallucinated_noun_rate"]
            cells = "".join(f"<th>{e(jflags.FLAG_LABELS.get(c, c))}</th>" for c in cols)
            body = ""
            for _, r in rates.iterrows():
                body += "<tr>" + "".join(
                    f"<td>{e(str(r[c])) if c in ('model', 'n_images') else e(f'{100 * float(r[c]):.1f}%')}</td>"
                    for c in cols) + "</tr>"
            head += f'<table border="1" cellpadding="3" style="border-collapse:collapse;font-size:12px"><tr>{cells}</tr>{body}</table>'
        doc = ("<!DOCTYPE html>\n<html lang=\"ja\"><head><meta charset=\"utf-8\">"
               f"<title>{e(self.title)}</title><style>{STYLE}</style></head>"
               f'<body class="jpfb"><h1>{e(self.title)}</h1>{head}{self.blocks_html(items)}</body></html>\n')
        return atomic_write_text(path, doc)

    def export_report(self, path: str | Path, rates=None, max_items: Optional[int] = EXPORT_MAX_ITEMS) -> str:
        """:meth:`export_html`, then one line saying what was written: ``wrote PATH (N KiB, M images)``,
        with ``of K, capped`` when the filters let more images through than ``max_items``."""
        out = self.export_html(path, max_items=max_items, rates=rates)
        n = len(self._filtered) if max_items is None else min(len(self._filtered), max_items)
        capped = f" of {len(self._filtered)}, capped" if n < len(self._filtered) else ""
        return f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB, {n} images{capped})"

    def _ipython_display_(self) -> None:  # pragma: no cover - needs a frontend
        from IPython.display import display

        display(self.widget)
