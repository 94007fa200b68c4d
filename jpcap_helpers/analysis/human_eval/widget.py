"""The rater: an ipywidgets view of one item at a time — the image, two captions side by side as
"A" (left) and "B" (right) in the sample's seeded random order (system names hidden), which is better
(or a tie), adequacy and fluency 1–5 for each, and a hallucination / bias / privacy flag for each.
Every submit appends one judgement to the rater's own JSONL (flushed and fsynced) and moves to the
next item this rater has not judged, so a closed notebook resumes where it stopped. Building it
never blocks (headless runs only display it); :meth:`RaterWidget.submit` is what the button calls."""
from __future__ import annotations

import html
from pathlib import Path
from typing import Optional, Sequence

from ..browser import _thumbnail_uri
from .sampling import Sample
from .storage import FLAG_CHOICES, RatingStore

__all__ = ["RaterWidget"]

_PREF_LABELS = {"A is better": "left", "tie": "tie", "B is better": "right"}


class RaterWidget:
    """``RaterWidget(sample, ratings_dir, rater)``; ``.widget`` is the ipywidgets box to display."""

    def __init__(self, sample: Sample, ratings_dir: str | Path, rater: str = "", image_size: int = 320):
        import ipywidgets as w

        self.sample, self.ratings_dir, self.image_size = sample, Path(ratings_dir), image_size
        self.store: Optional[RatingStore] = None
        self.current: Optional[dict] = None
        self.rater_box = w.Text(value=rater, description="rater", placeholder="your name (letters/digits)")
        self.start = w.Button(description="start / resume", button_style="info")
        self.image = w.HTML()
        self.captions = w.HTML()
        self.preference = w.ToggleButtons(options=list(_PREF_LABELS), value=None, description="better")

        def scale(desc: str):
            return w.IntSlider(value=3, min=1, max=5, description=desc, continuous_update=False)

        self.adequacy = (scale("A adequacy"), scale("B adequacy"))
        self.fluency = (scale("A fluency"), scale("B fluency"))
        self.flag_boxes = tuple({f: w.Checkbox(value=False, description=f"{side}: {f}", indent=False)
                                 for f in FLAG_CHOICES} for side in ("A", "B"))
        self.comment = w.Text(description="comment", placeholder="optional")
        self.submit_button = w.Button(description="submit and next", button_style="success")
        self.status = w.HTML()
        self.start.on_click(lambda _b: self.begin(self.rater_box.value.strip()))
        self.submit_button.on_click(lambda _b: self._submit_from_controls())
        self.widget = w.VBox([
            w.HBox([self.rater_box, self.start]), self.status, self.image, self.captions, self.preference,
            w.HBox([w.VBox([self.adequacy[0], self.fluency[0], *self.flag_boxes[0].values()]),
                    w.VBox([self.adequacy[1], self.fluency[1], *self.flag_boxes[1].values()])]),
            self.comment, self.submit_button])
        if rater:
            self.begin(rater)
        else:
            self.status.value = "Type your name and press <b>start / resume</b>."

    # ---- state --------------------------------------------------------------------------
    def begin(self, rater: str) -> None:
        """Open (or resume) ``rater``'s file and show their first unjudged item."""
        try:
            self.store = RatingStore(self.ratings_dir, rater, self.sample)
        except ValueError as e:
            self.status.value = f"<span style='color:#b00'>{html.escape(str(e))}</span>"
            return
        self._show_next()

    def _show_next(self) -> None:
        pending = self.store.pending() if self.store else []
        done = len(self.sample.items) - len(pending)
        self.current = pending[0] if pending else None
        if self.current is None:
            self.status.value = f"<b>All {done} items judged</b> by {html.escape(self.store.rater)} — thank you."
            self.image.value = self.captions.value = ""
            return
        it = self.current
        self.status.value = f"item {done + 1} of {len(self.sample.items)} · rater {html.escape(self.store.rater)}"
        uri = _thumbnail_uri(it["image_path"], self.image_size)
        self.image.value = (f"<img src='{uri}' style='max-width:{self.image_size}px'>" if uri
                            else f"<i>image not readable: {html.escape(str(it['image_path']))}</i>")
        cell = "<td style='width:50%;vertical-align:top;padding:6px;border:1px solid #ccc'><b>{}</b><br>{}</td>"
        self.captions.value = ("<table style='width:100%'><tr>"
                               + cell.format("A", html.escape(it["captions"][it["left"]]))
                               + cell.format("B", html.escape(it["captions"][it["right"]])) + "</tr></table>")
        self.preference.value = None
        for s in (*self.adequacy, *self.fluency):
            s.value = 3
        for boxes in self.flag_boxes:
            for b in boxes.values():
                b.value = False
        self.comment.value = ""

    def submit(self, preference: str, adequacy: Sequence[int] = (3, 3), fluency: Sequence[int] = (3, 3),
               flags: Sequence[Sequence[str]] = ((), ()), comment: str = "") -> dict:
        """Store the judgement of the current item (``preference``: left / tie / right, i.e. A / tie / B)
        and show the next one; returns the stored judgement."""
        if self.store is None or self.current is None:
            raise RuntimeError("no item to judge: start with a rater name (or every item is judged)")
        row = {"item_id": self.current["item_id"], "preference": preference,
               "adequacy_left": int(adequacy[0]), "adequacy_right": int(adequacy[1]),
               "fluency_left": int(fluency[0]), "fluency_right": int(fluency[1]),
               "flags_left": list(flags[0]), "flags_right": list(flags[1]), "comment": comment}
        judgement = self.store.append(row, source="widget")
        self._show_next()
        return judgement

    def _submit_from_controls(self) -> None:
        if self.preference.value is None:
            self.status.value = "<span style='color:#b00'>Choose A, tie or B first.</span>"
            return
        try:
            self.submit(_PREF_LABELS[self.preference.value], [s.value for s in self.adequacy],
                        [s.value for s in self.fluency],
                        [[f for f, b in boxes.items() if b.value] for boxes in self.flag_boxes], self.comment.value)
        except ValueError as e:
            self.status.value = f"<span style='color:#b00'>{html.escape(str(e))}</span>"

    def _ipython_display_(self) -> None:  # pragma: no cover - needs a frontend
        from IPython.display import display

        display(self.widget)
