"""Human-in-the-loop filtering: a reviewer accepts or rejects captions while browsing failure cases
(:class:`DecisionPanel` beside the :class:`~.browser.FailureBrowser`), decisions are appended to a
JSONL (kill-safe, the last decision per (model, image) counts), and :func:`apply_decisions` writes the
prediction file without the rejected captions and scores it against the unfiltered one. Rejecting
is a product decision (show nothing rather than a wrong caption), not a fix: the coverage drops."""
from __future__ import annotations

import html
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from .. import io as jio

__all__ = ["DECISIONS", "DecisionStore", "DecisionPanel", "apply_decisions"]

DECISIONS = ("accept", "reject")


class DecisionStore:
    """``<run>/reports/decisions.jsonl`` (or any path): one line per decision, appended and fsynced."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.bad_lines: list[str] = []

    def decide(self, model: str, image_id: int, decision: str, reviewer: str = "", note: str = "") -> dict:
        if decision not in DECISIONS:
            raise ValueError(f"decision must be one of {DECISIONS}, got {decision!r}")
        if isinstance(image_id, bool) or not isinstance(image_id, int):
            raise ValueError(f"image_id must be an integer, got {image_id!r}")
        row = {"model": str(model), "image_id": image_id, "decision": decision, "reviewer": str(reviewer),
               "note": str(note), "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        jio.append_jsonl(self.path, [row])
        return row

    def load(self) -> dict[tuple[str, int], str]:
        """``{(model, image_id): last decision}``; unreadable or invalid lines are skipped and listed in
        :attr:`bad_lines` (file:line, why)."""
        self.bad_lines = []
        out: dict[tuple[str, int], str] = {}
        if not self.path.exists():
            return out
        for lineno, line in enumerate(self.path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                key = (str(r["model"]), int(r["image_id"]))
                if r["decision"] not in DECISIONS:
                    raise ValueError(f"decision {r['decision']!r}")
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                self.bad_lines.append(f"{self.path.name}:{lineno} ({type(e).__name__}: {e})")
                continue
            out[key] = r["decision"]
        return out


class DecisionPanel:
    """Accept / reject buttons for the focus model's captions on the browser's current page.
    ``.widget`` displays it; :meth:`decide` is what the buttons call (tests call it headless)."""

    def __init__(self, browser: Any, store: DecisionStore, reviewer: str = ""):
        import ipywidgets as w

        self.browser, self.store, self.reviewer = browser, store, reviewer
        self.w_image = w.Dropdown(options=[], description="image")
        self.w_accept = w.Button(description="accept", button_style="success")
        self.w_reject = w.Button(description="reject", button_style="danger")
        self.w_status = w.HTML()
        self.w_accept.on_click(lambda _b: self._click("accept"))
        self.w_reject.on_click(lambda _b: self._click("reject"))
        browser.w_page.observe(lambda _c: self.refresh(), names="value")
        browser.w_model.observe(lambda _c: self.refresh(), names="value")
        self.widget = w.HBox([self.w_image, self.w_accept, self.w_reject, self.w_status])
        self.refresh()

    def _model(self) -> Optional[str]:
        m = self.browser.w_model.value
        return m if m in self.browser.models else None

    def refresh(self) -> None:
        self.w_image.options = [it["image_id"] for it in self.browser.page_items()]
        decided = self.store.load()
        counts = {d: sum(v == d for v in decided.values()) for d in DECISIONS}
        self.w_status.value = html.escape(f"decisions: {counts['accept']} accepted, {counts['reject']} rejected"
                                          + ("" if self._model() else " · pick one model to decide"))

    def decide(self, image_id: int, decision: str) -> dict:
        model = self._model()
        if model is None:
            raise ValueError("pick one model (not '(any model)') in the browser before deciding")
        row = self.store.decide(model, int(image_id), decision, self.reviewer)
        self.refresh()
        return row

    def _click(self, decision: str) -> None:
        if self.w_image.value is None:
            return
        try:
            self.decide(self.w_image.value, decision)
        except ValueError as e:
            self.w_status.value = f"<span style='color:#b00'>{html.escape(str(e))}</span>"


def apply_decisions(pred_path: str | Path, model: str, store: DecisionStore, references_path: str | Path,
                    out_path: str | Path, n_resamples: int = 1000, seed: int = 0):
    """Write ``pred_path`` without the captions rejected for ``model`` to ``out_path`` (atomically) and
    return the table: all vs after review (images, coverage, CIDEr and flag rates with CIs)."""
    import pandas as pd

    from ..evaluate import load_references
    from .mitigations import score_variant

    refs = load_references(references_path)
    decided = store.load()
    rows = [r for r in jio.read_jsonl(pred_path, tolerate_partial_last=True) if r.get("image_id") in refs]
    kept = [r for r in rows if decided.get((model, int(r["image_id"]))) != "reject"]
    jio.atomic_write_jsonl(out_path, kept)
    caps = {int(r["image_id"]): r.get("caption") or "" for r in rows}
    table = [score_variant(caps, refs, "all", n_resamples, seed)]
    if kept:
        table.append(score_variant({int(r["image_id"]): r.get("caption") or "" for r in kept}, refs,
                                   f"after review ({len(rows) - len(kept)} rejected)", n_resamples, seed))
    df = pd.DataFrame(table)
    df["coverage"] = df["n_images"] / max(len(rows), 1)
    return df
