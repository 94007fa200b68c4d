"""Mitigation tables (analysis/mitigations): flag-rate CIs and the rule-based filter."""
from __future__ import annotations

import json

from jpcap_helpers.analysis import flags, mitigations


def test_rule_filter_drops_flagged_captions_and_reports_coverage(tmp_path):
    refs = tmp_path / "test.jsonl"
    colours = ["赤い", "青い", "白い", "黒い", "緑の", "黄色い"]
    refs.write_text("".join(json.dumps({"image_id": i, "file_name": f"{i}.jpg",
                                        "captions": [f"{c} 丸 が ある", f"{c} 円 が 見える"]}, ensure_ascii=False) + "\n"
                            for i, c in enumerate(colours)), encoding="utf-8")
    preds = tmp_path / "p.jsonl"
    caps = ["赤い 丸 が ある", "a red circle", "", "黒い 丸 が ある", "丸丸丸丸丸丸丸丸", "黄色い 円"]
    preds.write_text("".join(json.dumps({"image_id": i, "caption": c}, ensure_ascii=False) + "\n"
                             for i, c in enumerate(caps)), encoding="utf-8")
    table = mitigations.rule_filter(preds, refs, tmp_path / "kept.jsonl", n_resamples=200)
    kept = [json.loads(line)["image_id"] for line in (tmp_path / "kept.jsonl").read_text().splitlines()]
    assert kept == [0, 3, 5]
    all_row, kept_row = table.to_dict("records")
    assert all_row["n_images"] == 6 and kept_row["n_images"] == 3 and kept_row["coverage"] == 0.5
    assert all_row["non_japanese"] > 0 and kept_row["non_japanese"] == 0 and kept_row["empty"] == 0
    assert kept_row["CIDEr"] > all_row["CIDEr"]


def test_flag_rate_cis_bracket_the_rate():
    df = flags.flag_predictions({i: ("a cat" if i % 4 == 0 else "赤い 丸") for i in range(40)},
                                {i: ["赤い 丸"] for i in range(40)})
    rate, lo, hi = mitigations.flag_rate_cis(df, n_resamples=500)["non_japanese"]
    assert rate == 0.25 and lo < 0.25 < hi and 0 <= lo and hi <= 1


def test_review_decisions_filter_predictions(tmp_path):
    from jpcap_helpers.analysis import browser as jb
    from jpcap_helpers.analysis import decisions

    refs = tmp_path / "test.jsonl"
    colours = ["赤い", "青い", "白い", "黒い"]
    refs.write_text("".join(json.dumps({"image_id": i, "file_name": f"{i}.jpg", "captions": [f"{c} 丸 が ある"]},
                                       ensure_ascii=False) + "\n" for i, c in enumerate(colours)), encoding="utf-8")
    preds = tmp_path / "m__test.jsonl"
    preds.write_text("".join(json.dumps({"image_id": i, "caption": c}, ensure_ascii=False) + "\n"
                             for i, c in enumerate(["赤い 丸 が ある", "犬 が 走る", "白い 丸 が ある", "猫"])),
                     encoding="utf-8")
    fb = jb.FailureBrowser.from_sources([jb.PredictionSource("m", preds)], refs, tmp_path)
    store = decisions.DecisionStore(tmp_path / "decisions.jsonl")
    panel = decisions.DecisionPanel(fb, store, reviewer="t")
    assert set(panel.w_image.options) <= {0, 1, 2, 3} and panel.w_image.options
    panel.decide(1, "reject")
    panel.decide(3, "reject")
    panel.decide(3, "accept")                      # changed my mind: the last decision counts
    with open(store.path, "a", encoding="utf-8") as fh:
        fh.write('{"model": "m", "image_id": 2, "decision": "maybe"}\n{"model"')
    assert store.load() == {("m", 1): "reject", ("m", 3): "accept"} and len(store.bad_lines) == 2
    table = decisions.apply_decisions(preds, "m", store, refs, tmp_path / "kept.jsonl", n_resamples=100)
    kept = [json.loads(line)["image_id"] for line in (tmp_path / "kept.jsonl").read_text().splitlines()]
    assert kept == [0, 2, 3] and list(table["n_images"]) == [4, 3] and table["coverage"].iloc[1] == 0.75
    import pytest
    with pytest.raises(ValueError, match="decision"):
        store.decide("m", 0, "drop")


def test_compact_folds_the_intervals():
    import pandas as pd

    df = pd.DataFrame([{"variant": "x", "CIDEr": 1.234, "CIDEr_lo": 1.0, "CIDEr_hi": 1.5, "empty": 0.25,
                        "empty_lo": 0.1, "empty_hi": 0.4}])
    assert mitigations.compact(df).to_dict("records") == [
        {"variant": "x", "CIDEr": "1.23 [1.00, 1.50]", "empty %": "25.0 [10.0, 40.0]"}]
