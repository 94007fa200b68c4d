"""A static HTML rating form (one self-contained page: images as data URIs, no server) for classmates
without Jupyter, and the import of its answers. The page shows every item with its two captions as
A/B (the sample's blind order), keeps the answers in the browser's localStorage while rating, and
its button downloads ``<rater>.jsonl``; :func:`import_form_answers` validates every line with the
same rules as the widget (:func:`.storage.validate_judgement`) and appends the new ones to that
rater's file."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ...io import append_jsonl, atomic_write_text
from ..browser import _thumbnail_uri
from .sampling import Sample
from .storage import FLAG_CHOICES, JudgementError, load_ratings, rater_file, validate_judgement

__all__ = ["form_html", "export_form", "import_form_answers", "FORM_FIELDS"]

#: the fields one answer line holds (what the page's JavaScript writes)
FORM_FIELDS = ("sample_id", "item_id", "rater", "preference", "adequacy_left", "adequacy_right", "fluency_left",
               "fluency_right", "flags_left", "flags_right", "comment", "time", "source")

_TEMPLATE = """<!doctype html>
<html lang="ja"><head><meta charset="utf-8"><title>{{ title }}</title>
<style>
body{font-family:sans-serif;max-width:980px;margin:auto;padding:1em}
.item{border:1px solid #bbb;border-radius:6px;margin:1em 0;padding:.8em}
.caps{display:flex;gap:1em}.cap{flex:1;border:1px solid #ddd;padding:.5em;min-height:3em}
.done{background:#eef8ee}label{margin-right:.8em}img{max-width:320px}
</style></head><body>
<h1>{{ title }}</h1>
<p>Sample <code>{{ sample_id }}</code>, {{ items|length }} images. For each image: which caption describes it
better (A, tie or B), adequacy and fluency of each caption (1 = very bad … 5 = very good), and a flag when a
caption invents things (hallucination), stereotypes people (bias) or reveals private details (privacy). The
captions are in random order; you are not told which system wrote which. Your answers are kept in this
browser while you rate; press <b>Download answers</b> at the end and send the file to your teacher.</p>
<p>Your name (letters, digits, . _ -): <input id="rater" maxlength="40"></p>
{% for it in items %}
<div class="item" data-item="{{ it.item_id }}">
<div>{{ loop.index }} / {{ items|length }}</div>
{% if it.image %}<img src="{{ it.image }}" alt="image {{ it.image_id }}">{% else %}<i>image not available</i>{% endif %}
<div class="caps"><div class="cap"><b>A</b><br>{{ it.a }}</div><div class="cap"><b>B</b><br>{{ it.b }}</div></div>
<p>Better:
{% for v, l in [("left", "A"), ("tie", "tie"), ("right", "B")] %}<label><input type="radio" name="pref-{{ it.item_id }}" value="{{ v }}"> {{ l }}</label>{% endfor %}</p>
{% for side, l in [("left", "A"), ("right", "B")] %}<p>{{ l }}:
adequacy <select name="adequacy_{{ side }}"><option value="">–</option>{% for s in range(1, 6) %}<option>{{ s }}</option>{% endfor %}</select>
fluency <select name="fluency_{{ side }}"><option value="">–</option>{% for s in range(1, 6) %}<option>{{ s }}</option>{% endfor %}</select>
{% for f in flags %}<label><input type="checkbox" name="flags_{{ side }}" value="{{ f }}"> {{ f }}</label>{% endfor %}</p>{% endfor %}
<p>Comment: <input name="comment" size="60"></p>
</div>
{% endfor %}
<p><button id="download">Download answers (JSONL)</button> <span id="status"></span></p>
<script>
const SAMPLE_ID = {{ sample_id|tojson }};
const KEY = "jpcap-rating-" + SAMPLE_ID;
function answers() {
  const rater = document.getElementById("rater").value.trim();
  const out = []; let incomplete = 0;
  document.querySelectorAll(".item").forEach(div => {
    const pref = div.querySelector("input[type=radio]:checked");
    const sel = n => div.querySelector("select[name=" + n + "]").value;
    const scores = ["adequacy_left", "adequacy_right", "fluency_left", "fluency_right"].map(sel);
    if (!pref && scores.every(s => s === "")) return;
    if (!pref || scores.some(s => s === "")) { incomplete++; return; }
    const flags = side => Array.from(div.querySelectorAll("input[name=flags_" + side + "]:checked")).map(b => b.value);
    out.push({sample_id: SAMPLE_ID, item_id: div.dataset.item, rater: rater, preference: pref.value,
              adequacy_left: +scores[0], adequacy_right: +scores[1], fluency_left: +scores[2], fluency_right: +scores[3],
              flags_left: flags("left"), flags_right: flags("right"),
              comment: div.querySelector("input[name=comment]").value, time: new Date().toISOString(), source: "form"});
    div.classList.add("done");
  });
  return {rater, out, incomplete};
}
function save() {
  const state = {rater: document.getElementById("rater").value, items: {}};
  document.querySelectorAll(".item").forEach(div => {
    state.items[div.dataset.item] = Array.from(div.querySelectorAll("input,select")).map(
      e => e.type === "radio" || e.type === "checkbox" ? e.checked : e.value);
  });
  localStorage.setItem(KEY, JSON.stringify(state));
}
function restore() {
  const state = JSON.parse(localStorage.getItem(KEY) || "null"); if (!state) return;
  document.getElementById("rater").value = state.rater || "";
  document.querySelectorAll(".item").forEach(div => {
    const vals = state.items[div.dataset.item]; if (!vals) return;
    Array.from(div.querySelectorAll("input,select")).forEach((e, i) => {
      if (e.type === "radio" || e.type === "checkbox") e.checked = vals[i]; else e.value = vals[i]; });
  });
}
document.addEventListener("change", save); restore();
document.getElementById("download").onclick = () => {
  const {rater, out, incomplete} = answers();
  const status = document.getElementById("status");
  if (!/^[A-Za-z0-9_.-]{1,40}$/.test(rater)) { status.textContent = "Type your name first (letters, digits, . _ -)."; return; }
  const blob = new Blob([out.map(o => JSON.stringify(o)).join("\\n") + (out.length ? "\\n" : "")], {type: "application/json"});
  const a = document.createElement("a"); a.href = URL.createObjectURL(blob); a.download = rater + ".jsonl"; a.click();
  status.textContent = out.length + " answers saved" + (incomplete ? "; " + incomplete + " started items lack a choice or a score and were left out" : "") + ".";
};
</script></body></html>
"""


def form_html(sample: Sample, title: str = "Caption rating", image_size: int = 320) -> str:
    """The page (UTF-8 text): every item of ``sample`` with its image embedded as a data URI."""
    import jinja2

    env = jinja2.Environment(autoescape=True)
    items = [{"item_id": it["item_id"], "image_id": it["image_id"], "image": _thumbnail_uri(it["image_path"], image_size),
              "a": it["captions"][it["left"]], "b": it["captions"][it["right"]]} for it in sample.items]
    return env.from_string(_TEMPLATE).render(title=title, sample_id=sample.sample_id, items=items, flags=FLAG_CHOICES)


def export_form(sample: Sample, path: str | Path, title: str = "Caption rating") -> Path:
    """Write the form atomically to ``path``."""
    return atomic_write_text(path, form_html(sample, title))


def import_form_answers(answers_path: str | Path, sample: Sample, ratings_dir: str | Path,
                        rater: Optional[str] = None) -> dict:
    """Append a downloaded answers file to its rater's JSONL. Every line is validated like a widget
    judgement; broken or invalid lines are skipped and counted (file:line and why), an item the rater
    already judged is not appended again. ``rater`` overrides the name typed in the form. Returns the
    counts (``imported``, ``already_rated``, ``invalid`` with the reasons, ``rater_file``)."""
    answers_path = Path(answers_path)
    rows, invalid = [], []
    for lineno, line in enumerate(answers_path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            if rater is not None and isinstance(obj, dict):
                obj["rater"] = rater
            rows.append(validate_judgement(obj, sample, source="form"))
        except json.JSONDecodeError as e:
            invalid.append(f"{answers_path.name}:{lineno} (not JSON: {e.msg})")
        except JudgementError as e:
            invalid.append(f"{answers_path.name}:{lineno} ({e})")
    names = {r["rater"] for r in rows}
    if len(names) > 1:
        raise JudgementError(f"{answers_path}: answers of several raters {sorted(names)}: one file per rater "
                             "(or pass rater=...)")
    out = {"imported": 0, "already_rated": 0, "invalid": invalid, "rater_file": None}
    if not rows:
        return out
    name = rows[0]["rater"]
    df, _ = load_ratings(ratings_dir, sample, raters=[name], quiet=True)
    done = set(df["item_id"]) if len(df) else set()
    new = []
    for r in rows:
        if r["item_id"] in done:
            out["already_rated"] += 1
            continue
        done.add(r["item_id"])
        new.append(r)
    path = rater_file(ratings_dir, name)
    append_jsonl(path, new)
    out.update(imported=len(new), rater_file=str(path))
    return out
