"""Human evaluation (analysis/human_eval): sampling, kill-safe storage, statistics on synthetic
ratings with known agreement, the HTML form's round trip and the headless rater widget."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from jpcap_helpers.analysis import human_eval as he
from jpcap_helpers.analysis.human_eval import stats

SYSTEMS = ["base", "base+ft"]


@pytest.fixture()
def raw_items(tmp_path):
    items = []
    for split, n in (("test", 12), ("yj_test", 6)):
        for i in range(n):
            path = tmp_path / f"{split}_{i}.png"
            Image.new("RGB", (40, 30), (10 * i, 80, 120)).save(path)
            items.append({"image_id": i, "split": split, "image_path": str(path),
                          "captions": {"base": f"赤い 丸 {i}", "base+ft": f"青い 四角 が ある {i}"},
                          "cider": {"base": 0.1 * i, "base+ft": 0.2 * i + (0.5 if split == "yj_test" else 0)}})
    items.append({"image_id": 99, "split": "test", "image_path": "x", "captions": {"base": "only one"}})
    return items


@pytest.fixture()
def sample(raw_items):
    return he.draw_sample(raw_items, SYSTEMS, n=9, seed=3)


def _judge(item, pref="left", ade=(4, 2), flu=(5, 3)):
    return {"item_id": item["item_id"], "preference": pref, "adequacy_left": ade[0], "adequacy_right": ade[1],
            "fluency_left": flu[0], "fluency_right": flu[1], "flags_left": [], "flags_right": ["hallucination"]}


def test_sample_is_seeded_stratified_and_blind(sample, raw_items, tmp_path):
    items = [dict(it) for it in sample.items]
    assert len(items) == 9 and "test:99" not in {it["item_id"] for it in items}   # a missing caption: left out
    assert all(v["drawn"] >= 1 for v in sample.strata.values()) and len(sample.strata) == 6
    assert sum(v["drawn"] for v in sample.strata.values()) == 9
    assert {it["left"] for it in items} == set(SYSTEMS), "both orders occur"
    assert he.draw_sample(raw_items, SYSTEMS, n=9, seed=3).items == sample.items          # seeded
    other = he.draw_sample(raw_items, SYSTEMS, n=9, seed=4)
    assert [it["item_id"] for it in other.items] != [it["item_id"] for it in items] and other.sample_id != sample.sample_id
    assert he.load_sample(sample.save(tmp_path / "s.json")).items == sample.items
    assert len(he.draw_sample(raw_items, SYSTEMS, n=100).items) == 18, "at most every usable item"
    with pytest.raises(ValueError, match="two different systems"):
        he.draw_sample(items, ["a", "a"], 3)


def test_store_appends_resumes_and_counts_bad_lines(sample, tmp_path):
    store = he.RatingStore(tmp_path / "r", "aiko", sample)
    first, second = sample.items[:2]
    store.append(_judge(first))
    assert [it["item_id"] for it in store.pending()] == [it["item_id"] for it in sample.items[1:]]
    store.append(_judge(second, "tie"))
    store.append(_judge(second, "right"))              # a repeated judgement: the last counts
    with open(store.path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({**_judge(first), "rater": "aiko", "sample_id": sample.sample_id, "adequacy_left": 7}) + "\n")
        fh.write('{"sample_id": "' + sample.sample_id + '", "item_id": ')   # a kill's partial last line
    n_lines = len(store.path.read_text().splitlines())
    df, rep = he.load_ratings(tmp_path / "r", sample)
    assert len(df) == 2 and rep.duplicates == 1 and len(rep.broken) == 1 and len(rep.invalid) == 1
    assert "aiko.jsonl:4" in rep.invalid[0] and "adequacy_left" in rep.invalid[0] and "aiko.jsonl:5" in rep.broken[0]
    assert df.set_index("item_id").loc[second["item_id"], "preference"] == "right"
    assert len(store.path.read_text().splitlines()) == n_lines, "nothing rewritten or lost"
    with pytest.raises(he.JudgementError, match="preference"):
        store.append({**_judge(first), "preference": "A"})
    with pytest.raises(he.JudgementError, match="rater"):
        he.RatingStore(tmp_path / "r", "../evil", sample)


def test_kappas_and_spearman_against_hand_computed_values():
    assert stats.cohen_kappa(list("aabbcab"), list("aabbcab")) == 1.0
    a = ["y"] * 25 + ["n"] * 25
    b = ["y"] * 20 + ["n"] * 5 + ["y"] * 10 + ["n"] * 15
    assert stats.cohen_kappa(a, b) == pytest.approx(0.4)     # p_o 0.7, p_e 0.5
    assert np.isnan(stats.cohen_kappa(["y"] * 4, ["y"] * 4))  # undefined, not 1
    wiki = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1], [7, 7, 0, 0, 0],
            [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    assert stats.fleiss_kappa(wiki) == pytest.approx(0.2099, abs=1e-4)
    assert stats.fleiss_kappa([[3, 0], [0, 3], [3, 0]]) == pytest.approx(1.0)
    assert stats.spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / 95 ** 0.5)
    assert stats.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1)


def test_report_on_synthetic_raters(sample, tmp_path):
    assert "No ratings yet" in he.human_eval_report(sample, tmp_path / "none")["text"]
    rdir = tmp_path / "r"
    for rater in ("a", "b", "c"):
        store = he.RatingStore(rdir, rater, sample)
        for it in sample.items:   # everyone prefers the fine-tuned system, rating it by its CIDEr
            ft_left = it["left"] == "base+ft"
            ade_ft = 1 + min(4, int(it["cider"]["base+ft"] * 2))
            store.append(_judge(it, "left" if ft_left else "right",
                                ade=(ade_ft, 1) if ft_left else (1, ade_ft)))
    rep = he.human_eval_report(sample, rdir, n_resamples=300)
    wr = rep["win_rates"].set_index("outcome")
    assert wr.loc["base+ft", "share"] == 1.0 and wr.loc["base", "n"] == 0 and wr.loc["tie", "n"] == 0
    agree = rep["agreement"]
    assert agree["measure"] == "Fleiss' κ" and agree["n_items"] == 9
    assert np.isnan(agree["kappa"])     # one category only: chance agreement 1, κ undefined (not 1)
    # two raters disagreeing on a known table
    rdir2 = tmp_path / "r2"
    prefs_a = ["left", "left", "right", "right", "tie", "left", "right", "tie", "left"]
    prefs_b = ["left", "right", "right", "right", "tie", "left", "left", "tie", "left"]
    for rater, prefs in (("a", prefs_a), ("b", prefs_b)):
        store = he.RatingStore(rdir2, rater, sample)
        for it, p in zip(sample.items, prefs):
            store.append(_judge(it, p))
    agree = he.human_eval_report(sample, rdir2, n_resamples=100)["agreement"]
    wa = [it[p] if p != "tie" else "tie" for it, p in zip(sample.items, prefs_a)]
    wb = [it[p] if p != "tie" else "tie" for it, p in zip(sample.items, prefs_b)]
    assert agree["measure"] == "Cohen's κ" and agree["kappa"] == pytest.approx(stats.cohen_kappa(wa, wb))
    corr = rep["correlations"].set_index("human_score")
    assert corr.loc["adequacy", "spearman_rho"] > 0.5 and corr.loc["adequacy", "n_points"] == 18


def test_html_form_round_trip(sample, tmp_path):
    page = he.export_form(sample, tmp_path / "form.html").read_text(encoding="utf-8")
    assert page.count('class="item"') == len(sample.items) and "data:image/jpeg;base64," in page
    assert "base+ft" not in page, "the form is blind: no system names"
    for key in he.form.FORM_FIELDS:
        assert key in page, key
    # the answers as the page's JavaScript writes them
    answers = []
    for i, it in enumerate(sample.items[:5]):
        answers.append({"sample_id": sample.sample_id, "item_id": it["item_id"], "rater": "ken",
                        "preference": ["left", "tie", "right"][i % 3], "adequacy_left": 1 + i % 5,
                        "adequacy_right": 5 - i % 5, "fluency_left": 3, "fluency_right": 4,
                        "flags_left": ["bias"] if i == 2 else [], "flags_right": [], "comment": "ok",
                        "time": "2026-01-01T00:00:00Z", "source": "form"})
    path = tmp_path / "ken.jsonl"
    path.write_text("".join(json.dumps(a, ensure_ascii=False) + "\n" for a in answers) + "{broken\n", encoding="utf-8")
    res = he.import_form_answers(path, sample, tmp_path / "r")
    assert res["imported"] == 5 and len(res["invalid"]) == 1 and "ken.jsonl:6" in res["invalid"][0]
    df, _ = he.load_ratings(tmp_path / "r", sample)
    got = df.sort_values("item_id")[["item_id", "preference", "adequacy_left", "adequacy_right", "flags_left"]]
    want = sorted(((a["item_id"], a["preference"], a["adequacy_left"], a["adequacy_right"], a["flags_left"])
                   for a in answers))
    assert [tuple(r) for r in got.itertuples(index=False)] == want
    again = he.import_form_answers(path, sample, tmp_path / "r")
    assert again["imported"] == 0 and again["already_rated"] == 5


def test_widget_headless_submit_and_resume(sample, tmp_path):
    w = he.RaterWidget(sample, tmp_path / "r", rater="mei")
    first = w.current["item_id"]
    j = w.submit("tie", adequacy=(2, 5), fluency=(3, 4), flags=(["privacy"], []))
    assert j["item_id"] == first and j["flags_left"] == ["privacy"] and w.current["item_id"] != first
    assert "base" not in w.captions.value.replace("base64", ""), "captions shown blind"
    resumed = he.RaterWidget(sample, tmp_path / "r", rater="mei")
    assert resumed.current["item_id"] == w.current["item_id"]
    w.begin("bad name!")
    assert "rater" in w.status.value


def test_sample_for_run_draws_once_then_reloads(tmp_path):
    from jpcap_helpers.params import Params

    P = Params.from_dict({"run": {"name": "r", "output_dir": str(tmp_path / "out"), "seed": 5},
                          "data": {"root": str(tmp_path / "data")}, "evaluate": {"splits": ["test", "yj_test"]}})
    P.processed_dir.mkdir(parents=True)
    (P.processed_dir / "test.jsonl").write_text("".join(
        json.dumps({"image_id": i, "file_name": f"{i}.jpg", "captions": ["丸"]}) + "\n" for i in range(8)))
    preds = P.run_dir / "predictions"
    preds.mkdir(parents=True)
    for s in ("m", "m+ft"):
        (preds / f"{s}__test.jsonl").write_text("".join(
            json.dumps({"image_id": i, "caption": f"{s} {i}"}) + "\n" for i in range(8 if s == "m" else 6)))
    (P.run_dir / "scores").mkdir()
    (P.run_dir / "scores" / "m+ft__test.json").write_text(json.dumps({"per_image": [
        {"image_id": i, "CIDEr": i / 3} for i in range(6)]}))
    assert he.default_systems(["constant-caption", "m", "m+ft"]) == ["m", "m+ft"]
    s = he.sample_for_run(P, tmp_path / "s.json", ["m", "m+ft"], n=4)
    assert len(s.items) == 4 and s.seed == 5 and all(it["split"] == "test" for it in s.items)
    assert {it["image_id"] for it in s.items} <= set(range(6)), "only images both systems captioned"
    assert he.sample_for_run(P, tmp_path / "s.json", ["m+ft", "m"], n=10).items == s.items, "reloaded, not redrawn"
    with pytest.raises(ValueError, match="move the file"):
        he.sample_for_run(P, tmp_path / "s.json", ["m", "other"])


SHIM = """
const ANSWERS = %s, ITEMS = %s;
const el = v => ({value: v});
const divs = ITEMS.map(id => {
  const a = ANSWERS[id] || {};
  return {dataset: {item: id}, classList: {add() {}},
    querySelector(sel) {
      if (sel.startsWith("input[type=radio]")) return a.preference ? el(a.preference) : null;
      if (sel.startsWith("select[name=")) return el(a[sel.slice(12, -1)] === undefined ? "" : String(a[sel.slice(12, -1)]));
      if (sel === "input[name=comment]") return el(a.comment || "");
      throw new Error("selector " + sel);
    },
    querySelectorAll(sel) {
      if (sel === "input,select") return [];
      const m = sel.match(/^input\\[name=(flags_(left|right))\\]:checked$/);
      if (m) return (a[m[1]] || []).map(el);
      throw new Error("selector " + sel);
    }};
});
const nodes = {rater: el(%s), download: {}, status: {textContent: ""}};
global.document = {getElementById: id => nodes[id], querySelectorAll: s => s === ".item" ? divs : [],
  addEventListener() {}, createElement: () => ({click() { process.stdout.write(global.__blob); }})};
global.localStorage = {getItem: () => null, setItem() {}};
global.Blob = class { constructor(parts) { global.__blob = parts.join(""); } };
global.URL = {createObjectURL: () => "blob:x"};
"""


@pytest.mark.skipif(__import__("shutil").which("node") is None, reason="needs node to run the form's JavaScript")
def test_html_form_javascript_writes_answers_that_import(sample, tmp_path):
    import re
    import subprocess

    page = he.form_html(sample)
    script = re.search(r"<script>(.*)</script>", page, re.S).group(1)
    ids = re.findall(r'data-item="([^"]+)"', page)
    first, second, third = ids[:3]
    answers = {first: {"preference": "right", "adequacy_left": 2, "adequacy_right": 5, "fluency_left": 3,
                       "fluency_right": 4, "flags_left": ["hallucination", "privacy"], "comment": "猫はいない"},
               second: {"preference": "tie", "adequacy_left": 3, "adequacy_right": 3, "fluency_left": 3,
                        "fluency_right": 3},
               third: {"preference": "left"}}          # started, scores missing: left out and counted
    js = SHIM % (json.dumps(answers, ensure_ascii=False), json.dumps(ids), json.dumps("yui"))
    js += script + "\ndocument.getElementById('download').onclick();\n" \
                   "process.stderr.write(document.getElementById('status').textContent);"
    run = subprocess.run(["node", "-e", js], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "2 answers saved" in run.stderr and "1 started items" in run.stderr
    (tmp_path / "yui.jsonl").write_text(run.stdout, encoding="utf-8")
    res = he.import_form_answers(tmp_path / "yui.jsonl", sample, tmp_path / "r")
    assert res["imported"] == 2 and not res["invalid"]
    df, _ = he.load_ratings(tmp_path / "r", sample)
    got = df.set_index("item_id")
    assert got.loc[first, "preference"] == "right" and got.loc[first, "flags_left"] == ["hallucination", "privacy"]
    assert got.loc[first, "comment"] == "猫はいない" and got.loc[second, "adequacy_right"] == 3
    assert set(got["source"]) == {"form"} and set(got["rater"]) == {"yui"}
