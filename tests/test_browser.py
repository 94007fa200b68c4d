"""The failure-case browser, driven headless: filtering, sorting, paging, and its HTML export."""
import json
import re

import pytest
from PIL import Image

from jpcap_helpers.analysis.browser import ANY_MODEL, FailureBrowser, PredictionSource, prediction_sources

REFS = {
    1: ["赤い丸がある", "赤い円が一つある"],
    2: ["青い四角がある", "青い正方形"],
    3: ["人が犬と公園を歩いている", "犬を連れた人"],
    4: ["黄色い星", "黄色い星がある"],
    5: ["緑の三角", "緑色の三角形がある"],
    6: ["白い丸", "白い円"],
    7: ["黒い四角", "黒い正方形がある"],
}
# model "zs" (zero-shot) and "zs+ft" (fine-tuned): caption and per-image CIDEr
ZS = {1: ("A red circle", 0.0), 2: ("青い四角がある", 1.5), 3: ("男性が犬と歩いている", 0.4),
      4: ("星星星星星星", 0.1), 5: ("", 0.0), 6: ("白い丸", 2.0), 7: ("黒い<b>四角</b> & 線", 0.3)}
FT = {1: ("赤い丸がある", 2.5), 2: ("青い四角", 1.2), 3: ("人が犬と歩いている", 0.9),
      4: ("黄色い星がある", 1.8), 5: ("緑の三角", 1.1), 6: ("白い丸と白い丸と白い丸と白い丸", 0.2)}  # no 7


def _scores(path, table):
    per = [{"image_id": i, "CIDEr": c, "BLEU-4": c / 10, "ROUGE-L": c / 5, "bleu_stats": [0] * 10}
           for i, (_, c) in table.items()]
    path.write_text(json.dumps({"per_image": per}), encoding="utf-8")


@pytest.fixture()
def run(tmp_path):
    images = tmp_path / "images"
    (images / "val2014").mkdir(parents=True)
    refs_path = tmp_path / "test.jsonl"
    with open(refs_path, "w", encoding="utf-8") as fh:
        for i, caps in REFS.items():
            name = f"val2014/img_{i}.jpg"
            if i != 6:  # image 6 is missing on disk
                Image.new("RGB", (40 + i, 30), (20 * i, 100, 50)).save(images / name)
            fh.write(json.dumps({"image_id": i, "file_name": name, "captions": caps}, ensure_ascii=False) + "\n")
    sources = []
    for label, table in (("zs", ZS), ("zs+ft", FT)):
        pred = tmp_path / f"{label}__test.jsonl"
        pred.write_text("".join(json.dumps({"image_id": i, "caption": c}, ensure_ascii=False) + "\n"
                                for i, (c, _) in table.items()), encoding="utf-8")
        _scores(tmp_path / f"{label}__test.json", table)
        sources.append(PredictionSource(label, pred, tmp_path / f"{label}__test.json", finetuned="+" in label))
    return sources, refs_path, images


def by_cider(table, ids, reverse=False):
    return sorted(ids, key=lambda i: (table[i][1], i), reverse=reverse)


def test_default_view_focuses_the_finetuned_model_worst_first(run):
    b = FailureBrowser.from_sources(*run, page_size=3)
    assert b.models == ["zs", "zs+ft"]
    assert b.w_model.value == "zs+ft"
    assert [it["image_id"] for it in b.filtered_items()] == by_cider(FT, FT)   # 7 has no ft prediction
    assert b.shown_ids() == by_cider(FT, FT)[:3]
    assert b.n_pages == 2


def test_sort_orders(run):
    b = FailureBrowser.from_sources(*run, page_size=10)
    b.set(sort="cider_desc")
    assert b.shown_ids() == sorted(FT, key=lambda i: (-FT[i][1], i))
    b.set(sort="image id")
    assert b.shown_ids() == sorted(FT)
    b.set(sort="gap")
    gaps = {i: abs(FT[i][1] - ZS[i][1]) for i in FT}
    assert b.shown_ids()[0] == max(gaps, key=gaps.get)


def test_filter_by_flag_model_and_cider(run):
    b = FailureBrowser.from_sources(*run, page_size=10)
    b.set(flag="repetition")
    assert b.shown_ids() == [6]                     # the fine-tuned loop
    b.set(model="zs")
    assert b.shown_ids() == [4]                     # 星星星… of the zero-shot model
    b.set(flag="non_japanese")
    assert b.shown_ids() == [1, 4]                  # English; 星星星… has no kana either
    b.set(flag="gendered")
    assert b.shown_ids() == [3]
    b.set(model=ANY_MODEL, flag="(any flag)", sort="image_id")
    assert set(b.shown_ids()) >= {1, 3, 4, 5, 6}
    b.set(flag="(no flag)", model="zs+ft")
    assert 6 not in b.shown_ids()
    b.set(flag="(all images)", cider=(1.0, 2.0))
    assert sorted(b.shown_ids()) == sorted(i for i, (_, c) in FT.items() if 1.0 <= c <= 2.0)


def test_paging_with_buttons_and_page_size(run):
    b = FailureBrowser.from_sources(*run, page_size=3)
    order = by_cider(FT, FT)
    b.w_next.click()
    assert b.w_page.value == 2 and b.shown_ids() == order[3:6]
    b.w_next.click()                                 # already on the last page
    assert b.w_page.value == 2
    b.w_prev.click()
    assert b.shown_ids() == order[:3]
    b.w_page.value = 2
    b.set(flag="repetition")                         # a new filter goes back to page 1
    assert b.w_page.value == 1 and b.n_pages == 1
    b.set(flag="(all images)", page_size=5)
    assert b.n_pages == 2 and len(b.shown_ids()) == 5


def test_page_html_shows_models_side_by_side_with_scores_and_refs(run):
    b = FailureBrowser.from_sources(*run, page_size=10)
    b.set(sort="image_id")
    page = b.html
    assert page.count('class="jpfb-item"') == 6
    first = page.split('class="jpfb-item"')[1]
    assert first.count('class="jpfb-card"') == 2 and "赤い丸がある" in first and "赤い円が一つある" in first
    assert "CIDEr 2.500" in first
    b.set(models=["zs+ft"])
    assert "<h4>zs</h4>" not in b.html and "<h4>zs+ft</h4>" in b.html
    assert "(image not found)" in b.html             # image 6


def test_export_html_embeds_images_escapes_text_one_block_per_image(run, tmp_path):
    b = FailureBrowser.from_sources(*run, page_size=2)
    b.set(model=ANY_MODEL, sort="image_id")
    out = b.export_html(tmp_path / "reports" / "failure_cases.html")
    doc = out.read_text(encoding="utf-8")
    assert doc.startswith("<!DOCTYPE html>") and '<meta charset="utf-8">' in doc
    blocks = re.findall(r'<section class="jpfb-item" data-image-id="(\d+)"', doc)
    assert [int(i) for i in blocks] == sorted(REFS)   # every filtered image, not just the page
    assert doc.count("data:image/jpeg;base64,") == len(REFS) - 1   # image 6 is missing
    assert "黒い&lt;b&gt;四角&lt;/b&gt; &amp; 線" in doc and "<b>四角</b>" not in doc
    assert "人が犬と公園を歩いている" in doc          # UTF-8, not entity-encoded
    capped = b.export_html(tmp_path / "capped.html", max_items=2).read_text(encoding="utf-8")
    assert capped.count('class="jpfb-item"') == 2
    line = b.export_report(tmp_path / "report.html", max_items=2)
    assert line.startswith(f"wrote {tmp_path / 'report.html'} (") and line.endswith(f"2 images of {len(REFS)}, capped)")
    assert b.export_report(tmp_path / "all.html").endswith(f" {len(REFS)} images)")


def test_prediction_sources_of_a_run(tmp_path):
    class P:
        run_dir = tmp_path / "run"
    (P.run_dir / "predictions").mkdir(parents=True)
    for name in ("m+ft__test", "m__test", "m__yj_test", "a__test", "b__test"):
        (P.run_dir / "predictions" / f"{name}.jsonl").write_text("", encoding="utf-8")
    (P.run_dir / "predictions" / "a__test.meta.json").write_text('{"adapter": "/x/adapter"}', encoding="utf-8")
    found = prediction_sources(P, "test")
    assert [(s.label, s.finetuned) for s in found] == [("b", False), ("m", False), ("a", True), ("m+ft", True)]
    assert found[3].scores == P.run_dir / "scores" / "m+ft__test.json"
