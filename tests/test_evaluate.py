"""Tests for jpcap_helpers.evaluate: Japanese BLEU/ROUGE-L/CIDEr, bootstrap, paired test, CLI, metrics.csv."""
from __future__ import annotations

import json
import math
import random
import subprocess
import sys

import numpy as np
import pytest
from pycocoevalcap.bleu.bleu import Bleu

from jpcap_helpers import evaluate as ev
from jpcap_helpers.text import segment

BETA = 1.2  # pycocoevalcap ROUGE-L beta


def rouge_f(p: float, r: float) -> float:
    return (1 + BETA**2) * p * r / (r + BETA**2 * p)


# Captions whose MeCab/unidic-lite segmentation the hand computations rely on.
DOG = "犬が公園で走っている"  # 犬|が|公園|で|走っ|て|いる (7)
CAT = "白い猫が公園のベンチで寝ている"  # 白い|猫|が|公園|の|ベンチ|で|寝|て|いる (10)
CAKE = "皿の上にケーキ"  # 皿|の|上|に|ケーキ (5)
OTHERS = ["鳥が空を飛んでいる", "電車が駅に止まっている", "馬が草原にいる", "子供がボールで遊んでいる"]


def test_segmentation_assumptions():
    assert segment(DOG) == ["犬", "が", "公園", "で", "走っ", "て", "いる"]
    assert segment(CAT) == ["白い", "猫", "が", "公園", "の", "ベンチ", "で", "寝", "て", "いる"]
    assert segment(CAKE) == ["皿", "の", "上", "に", "ケーキ"]


# --------------------------------------------------------------------------- hand-computed cases


def test_identical_caption_scores_one():
    r = ev.score({1: [DOG + "。"]}, {1: DOG + "。"}, n_resamples=0)
    for m in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L"):
        assert r[m] == pytest.approx(1.0, abs=1e-6), m
    assert r["per_image"][0]["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert r["n_images"] == 1


def test_disjoint_caption_scores_zero():
    refs = {1: [DOG], 2: [OTHERS[0]], 3: [OTHERS[1]]}
    preds = {1: CAKE, 2: OTHERS[0], 3: OTHERS[1]}
    r = ev.score(refs, preds, n_resamples=0)
    img1 = r["per_image"][0]
    assert img1["image_id"] == 1
    assert img1["BLEU-4"] == pytest.approx(0.0, abs=1e-3)
    assert img1["ROUGE-L"] == 0.0
    assert img1["CIDEr"] == 0.0
    assert img1["bleu_stats"][6:] == [0, 0, 0, 0]  # no clipped matches at any order
    assert r["per_image"][1]["CIDEr"] > 0  # identical captions in a multi-image corpus


def test_partial_overlap_hand_computed():
    r = ev.score({1: [CAT]}, {1: DOG}, n_resamples=0)
    # hyp: 犬 が 公園 で 走っ て いる (7) / ref: 白い 猫 が 公園 の ベンチ で 寝 て いる (10)
    # unigram matches: が 公園 で て いる = 5 of 7
    # hyp bigrams: 犬が が公園 公園で で走っ 走って ている (6); in ref: が公園, ている = 2 of 6
    # brevity penalty: hyp 7 < ref 10 -> exp(1 - 10/7)
    bp = math.exp(1 - 10 / 7)
    assert r["BLEU-1"] == pytest.approx(5 / 7 * bp, rel=1e-6)
    assert r["BLEU-2"] == pytest.approx(math.sqrt(5 / 7 * 2 / 6) * bp, rel=1e-6)
    # LCS = が 公園 で て いる = 5 -> P = 5/7, R = 5/10, F_beta with beta 1.2
    assert r["ROUGE-L"] == pytest.approx(rouge_f(5 / 7, 5 / 10), rel=1e-9)
    assert r["per_image"][0]["bleu_stats"] == [7, 10, 7, 6, 5, 4, 5, 2, 0, 0]


def test_multiple_references_clip_and_closest_length():
    # refs: 犬 が 公園 で 走っ て いる (7) and 皿 の 上 に ケーキ (5)
    r = ev.score({1: [DOG, CAKE]}, {1: "犬が犬が"}, n_resamples=0)
    # hyp 犬 が 犬 が (4): unigrams 犬x2 が x2, max ref count 1 each -> clipped 2 of 4
    # closest ref length to 4: |5-4|=1 beats |7-4|=3 -> 5, so BP = exp(1 - 5/4)
    assert r["per_image"][0]["bleu_stats"][:2] == [4, 5]
    assert r["BLEU-1"] == pytest.approx(2 / 4 * math.exp(1 - 5 / 4), rel=1e-6)


def test_punctuation_only_and_empty_predictions_score_zero():
    refs = {1: [DOG], 2: [CAT], 3: [CAKE]}
    r = ev.score(refs, {1: "。、！？「」", 2: "", 3: CAKE}, n_resamples=0)
    assert r["n_empty_predictions"] == 2
    for rec in r["per_image"][:2]:
        assert rec["BLEU-4"] == 0.0 and rec["ROUGE-L"] == 0.0 and rec["CIDEr"] == 0.0
    assert r["per_image"][2]["ROUGE-L"] == pytest.approx(1.0)


def test_normaliser_applied_to_predictions_and_references():
    r = ev.score({1: ["DVDが2枚ある。"]}, {1: "ＤＶＤが ２枚　ある．"}, n_resamples=0)
    assert r["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert r["ROUGE-L"] == pytest.approx(1.0)


def test_empty_references_dropped_and_counted():
    r = ev.score({1: [DOG, "。。"]}, {1: DOG}, n_resamples=0)
    assert r["n_references_dropped"] == 1
    with pytest.raises(ev.EvaluationError, match="image_id 1"):
        ev.score({1: ["、"]}, {1: DOG}, n_resamples=0)


# --------------------------------------------------------------------------- coverage rules


def test_missing_and_unknown_images():
    refs = {i: [DOG] for i in range(30)}
    preds = {i: DOG for i in range(5)}
    with pytest.raises(ev.EvaluationError) as exc:
        ev.score(refs, preds)
    msg = str(exc.value)
    assert "25 reference images have no prediction" in msg and "5, 6, 7" in msg and "(25 in total)" in msg
    r = ev.score(refs, preds, allow_missing=True, n_resamples=0)
    assert r["n_images"] == 5 and r["n_missing"] == 25 and r["missing_image_ids"][0] == 5
    with pytest.raises(ev.EvaluationError, match="not in the references: 99"):
        ev.score(refs, {**{i: DOG for i in range(30)}, 99: DOG})


# --------------------------------------------------------------------------- BLEU statistics & bootstrap


def _random_corpus(n_images: int, seed: int, vocab: int = 12):
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(vocab)]

    def sent(lo, hi):
        return " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))

    gts = {i: [sent(2, 12) for _ in range(rng.randint(1, 5))] for i in range(n_images)}
    res = {i: [sent(0, 12)] for i in range(n_images)}  # includes empty hypotheses
    return gts, res


def test_bleu_sufficient_stats_reproduce_pycocoevalcap():
    gts, res = _random_corpus(400, seed=7)
    corpus, per_image = Bleu(4).compute_score(gts, res, verbose=0)
    stats = np.array([ev.bleu_sufficient_stats(res[i][0], gts[i]) for i in gts], dtype=float)
    np.testing.assert_allclose(ev.corpus_bleu_from_stats(stats.sum(0)), corpus, rtol=1e-12, atol=0)
    # the same formula on one image's statistics gives pycocoevalcap's per-image BLEU
    per_image_ours = ev.corpus_bleu_from_stats(stats)
    np.testing.assert_allclose(per_image_ours.T, np.array(per_image), rtol=1e-10, atol=1e-300)


def test_bootstrap_replicates_equal_pycocoevalcap_on_duplicated_images():
    gts, res = _random_corpus(50, seed=3)
    stats = np.array([ev.bleu_sufficient_stats(res[i][0], gts[i]) for i in gts], dtype=float)
    rouge = np.random.default_rng(0).random(50)
    samples = ev.bootstrap_samples({"ROUGE-L": rouge, "CIDEr": 2 * rouge}, stats, 3, seed=11)
    weights = next(iter(ev.resample_weights(50, 3, seed=11)))  # the draws behind `samples`
    for j, w in enumerate(weights):
        assert w.sum() == 50
        # build the resampled corpus explicitly: image i repeated w[i] times under fresh ids
        dup_gts, dup_res, dup_rouge = {}, {}, []
        for i, times in enumerate(w.astype(int)):
            for t in range(times):
                dup_gts[(i, t)], dup_res[(i, t)] = gts[i], res[i]
                dup_rouge.append(rouge[i])
        expected, _ = Bleu(4).compute_score(dup_gts, dup_res, verbose=0)
        got = [samples[f"BLEU-{k}"][j] for k in range(1, 5)]
        np.testing.assert_allclose(got, expected, rtol=1e-12)
        assert samples["ROUGE-L"][j] == pytest.approx(np.mean(dup_rouge))
        assert samples["CIDEr"][j] == pytest.approx(2 * np.mean(dup_rouge))


def _scored_corpus(seed: int = 0, n: int = 60, quality: float = 0.5):
    rng = random.Random(seed)
    pool = [DOG, CAT, CAKE, *OTHERS]
    refs = {i: rng.sample(pool, 3) for i in range(n)}
    preds = {i: (refs[i][0] if rng.random() < quality else rng.choice(pool)) for i in range(n)}
    return refs, preds


def test_bootstrap_ci_contains_point_and_is_seeded():
    refs, preds = _scored_corpus()
    a = ev.score(refs, preds, n_resamples=300, seed=5)
    b = ev.score(refs, preds, n_resamples=300, seed=5)
    c = ev.score(refs, preds, n_resamples=300, seed=6)
    assert a["ci"] == b["ci"]
    assert a["ci"] != c["ci"]
    for m in ev.METRICS:
        lo, hi = a["ci"][m]
        assert lo <= a[m] <= hi, m
        assert lo < hi, m
    assert set(a["ci"]) == set(ev.METRICS)
    assert a["ci"] == ev.bootstrap_ci(a["per_image"], n_resamples=300, seed=5)


def test_rouge_cider_corpus_are_means_of_per_image():
    refs, preds = _scored_corpus(seed=2)
    r = ev.score(refs, preds, n_resamples=0)
    assert r["ROUGE-L"] == pytest.approx(np.mean([p["ROUGE-L"] for p in r["per_image"]]))
    assert r["CIDEr"] == pytest.approx(np.mean([p["CIDEr"] for p in r["per_image"]]))


def test_bootstrap_is_fast_for_5000_images():
    import time

    rng = np.random.default_rng(0)
    per_image = [
        {"image_id": i, "ROUGE-L": float(x), "CIDEr": float(y),
         "bleu_stats": [10, 11, 10, 9, 8, 7, 6, 4, 2, 1]}
        for i, (x, y) in enumerate(zip(rng.random(5000), rng.random(5000) * 2))
    ]
    start = time.perf_counter()
    ci = ev.bootstrap_ci(per_image, n_resamples=1000, seed=0)
    assert time.perf_counter() - start < 5.0
    assert ci["ROUGE-L"][0] < 0.5 < ci["ROUGE-L"][1]


# --------------------------------------------------------------------------- paired bootstrap


def test_paired_bootstrap_self_and_better_system():
    refs, worse = _scored_corpus(seed=1, quality=0.2)
    better = {i: refs[i][0] for i in refs}
    r_worse = ev.score(refs, worse, n_resamples=0)
    r_better = ev.score(refs, better, n_resamples=0)

    same = ev.paired_bootstrap(r_worse, r_worse, n_resamples=500, seed=0)
    for m in ev.METRICS:
        assert same[m]["diff"] == 0.0
        assert same[m]["p_value"] == pytest.approx(1.0)
        assert same[m]["ci"] == [0.0, 0.0]

    cmp = ev.paired_bootstrap(r_better, r_worse["per_image"], n_resamples=500, seed=0)
    for m in ev.METRICS:
        assert cmp[m]["a"] == pytest.approx(r_better[m])
        assert cmp[m]["b"] == pytest.approx(r_worse[m])
        assert cmp[m]["diff"] > 0
        assert cmp[m]["p_value"] < 0.01, m
        assert cmp[m]["ci"][0] > 0
    # order of per-image records does not matter
    shuffled = list(reversed(r_worse["per_image"]))
    assert ev.paired_bootstrap(r_better, shuffled, n_resamples=500, seed=0) == cmp


def test_paired_bootstrap_rejects_different_images():
    refs, preds = _scored_corpus(seed=1, n=10)
    a = ev.score(refs, preds, n_resamples=0)
    b = ev.score(refs, {i: preds[i] for i in range(9)}, allow_missing=True, n_resamples=0)
    with pytest.raises(ev.EvaluationError, match="only in A: 9"):
        ev.paired_bootstrap(a, b)


# --------------------------------------------------------------------------- loading


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_load_references_coco_and_jsonl(tmp_path):
    coco = {
        "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}, {"id": 3}],
        "annotations": [
            {"id": 10, "image_id": 1, "caption": DOG},
            {"id": 11, "image_id": 1, "caption": CAT},
            {"id": 12, "image_id": 2, "caption": CAKE},
        ],
    }
    (tmp_path / "refs.json").write_text(json.dumps(coco, ensure_ascii=False), encoding="utf-8")
    assert ev.load_references(tmp_path / "refs.json") == {1: [DOG, CAT], 2: [CAKE]}
    _write_jsonl(tmp_path / "val.jsonl", [
        {"image_id": 1, "file_name": "a.jpg", "captions": [DOG, CAT]},
        {"image_id": 2, "file_name": "b.jpg", "captions": [CAKE]},
    ])
    assert ev.load_references(tmp_path / "val.jsonl") == {1: [DOG, CAT], 2: [CAKE]}


def test_load_references_errors(tmp_path):
    bad = {"images": [{"id": 1}], "annotations": [{"image_id": 2, "caption": DOG}]}
    (tmp_path / "bad.json").write_text(json.dumps(bad), encoding="utf-8")
    with pytest.raises(ValueError, match=r"annotations\[0\].*not in 'images'"):
        ev.load_references(tmp_path / "bad.json")
    _write_jsonl(tmp_path / "dup.jsonl", [{"image_id": 1, "captions": [DOG]}, {"image_id": 1, "captions": [CAT]}])
    with pytest.raises(ValueError, match="line 2: duplicate image_id 1"):
        ev.load_references(tmp_path / "dup.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"image_id": 1, "captions": ["a"]}\n{"image_id": 2,\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken.jsonl: line 2"):
        ev.load_references(tmp_path / "broken.jsonl")


def test_load_predictions(tmp_path):
    path = _write_jsonl(tmp_path / "pred.jsonl", [
        {"image_id": 1, "caption": DOG, "model": "x"},
        {"image_id": 2, "error": "CUDA OOM"},
        {"image_id": 1, "caption": DOG},  # identical repeat is fine
    ])
    assert ev.load_predictions(path) == {1: DOG, 2: ""}
    _write_jsonl(tmp_path / "conflict.jsonl", [{"image_id": 1, "caption": DOG}, {"image_id": 1, "caption": CAT}])
    with pytest.raises(ValueError, match=r"conflict.jsonl: line 2.*first on line 1"):
        ev.load_predictions(tmp_path / "conflict.jsonl")
    assert ev.load_predictions(path).n_duplicate_rows == 1
    _write_jsonl(tmp_path / "nocap.jsonl", [{"image_id": 1}])
    with pytest.raises(ValueError, match="line 1: no 'caption'"):
        ev.load_predictions(tmp_path / "nocap.jsonl")
    _write_jsonl(tmp_path / "strid.jsonl", [{"image_id": "1", "caption": DOG}])
    with pytest.raises(ValueError, match="line 1: image_id must be an integer"):
        ev.load_predictions(tmp_path / "strid.jsonl")


def test_duplicate_rows_are_counted_in_the_result(tmp_path):
    path = _write_jsonl(tmp_path / "pred.jsonl", [
        {"image_id": 1, "caption": DOG}, {"image_id": 2, "caption": CAT},
        {"image_id": 1, "caption": DOG}, {"image_id": 1, "caption": DOG},
    ])
    r = ev.score({1: [DOG], 2: [CAT]}, ev.load_predictions(path), n_resamples=0)
    assert r["n_images"] == 2 and r["n_duplicate_rows"] == 2
    assert "duplicate prediction rows: 2" in ev.format_table(r)
    assert ev.score({1: [DOG]}, {1: DOG}, n_resamples=0)["n_duplicate_rows"] == 0   # a plain dict


def test_non_utf8_input_names_the_file_and_line(tmp_path):
    good = json.dumps({"image_id": 1, "caption": DOG}, ensure_ascii=False).encode("utf-8")
    bad = json.dumps({"image_id": 2, "caption": CAT}, ensure_ascii=False).encode("shift_jis")
    (tmp_path / "sjis.jsonl").write_bytes(good + b"\n" + bad + b"\n")
    with pytest.raises(ev.EvaluationError, match=r"sjis.jsonl: line 2 is not valid UTF-8"):
        ev.load_predictions(tmp_path / "sjis.jsonl")
    (tmp_path / "refs.jsonl").write_bytes(b'{"image_id": 1, "captions": ["a"]}\n' + bad.replace(b"caption", b"captions") + b"\n")
    with pytest.raises(ev.EvaluationError, match=r"refs.jsonl: line 2 is not valid UTF-8"):
        ev.load_references(tmp_path / "refs.jsonl")
    coco = json.dumps({"images": [{"id": 1}], "annotations": [{"image_id": 1, "caption": CAT}]},
                      ensure_ascii=False, indent=1).encode("shift_jis")
    (tmp_path / "refs.json").write_bytes(coco)
    line = coco[:coco.index(CAT.encode("shift_jis"))].count(b"\n") + 1
    with pytest.raises(ev.EvaluationError, match=rf"refs.json: line {line} is not valid UTF-8"):
        ev.load_references(tmp_path / "refs.json")


# --------------------------------------------------------------------------- CLI (jpcap evaluate)


def _cli(argv):
    from jpcap_helpers.cli import main

    return main(["evaluate", *argv])


@pytest.fixture
def cli_files(tmp_path):
    refs = {i: [DOG, CAT] if i % 2 else [CAKE, OTHERS[i % 4]] for i in range(1, 9)}
    _write_jsonl(tmp_path / "test.jsonl",
                 [{"image_id": i, "file_name": f"{i}.jpg", "captions": c} for i, c in refs.items()])
    _write_jsonl(tmp_path / "pred.jsonl", [{"image_id": i, "caption": c[0]} for i, c in refs.items()])
    _write_jsonl(tmp_path / "partial.jsonl", [{"image_id": i, "caption": refs[i][0]} for i in (1, 2, 3)])
    _write_jsonl(tmp_path / "unknown.jsonl",
                 [{"image_id": i, "caption": c[0]} for i, c in refs.items()] + [{"image_id": 77, "caption": DOG}])
    return tmp_path


def test_cli_writes_json_and_table(cli_files, capsys):
    out = cli_files / "out" / "metrics.json"
    rc = _cli(["--pred", str(cli_files / "pred.jsonl"), "--refs", str(cli_files / "test.jsonl"), "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text(encoding="utf-8"))
    for key in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr", "n_images", "n_missing", "ci", "per_image"):
        assert key in data
    assert data["n_images"] == 8 and data["n_missing"] == 0
    assert set(data["ci"]) == set(ev.METRICS) and all(len(v) == 2 for v in data["ci"].values())
    assert len(data["per_image"]) == 8 and {"image_id", "BLEU-4", "ROUGE-L", "CIDEr"} <= set(data["per_image"][0])
    printed = capsys.readouterr().out
    assert "BLEU-4" in printed and "CIDEr" in printed and "95% CI" in printed


def test_cli_missing_images_error_and_allow_missing(cli_files, capsys):
    args = ["--pred", str(cli_files / "partial.jsonl"), "--refs", str(cli_files / "test.jsonl")]
    assert _cli(args) == 2
    err = capsys.readouterr().err
    assert "partial.jsonl" in err and "5 reference images have no prediction: 4, 5, 6, 7, 8" in err
    assert "Traceback" not in err
    out = cli_files / "m.json"
    assert _cli(args + ["--allow-missing", "--out", str(out)]) == 0
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["n_images"] == 3 and data["n_missing"] == 5


def test_cli_unknown_image_and_bad_files(cli_files, capsys):
    assert _cli(["--pred", str(cli_files / "unknown.jsonl"), "--refs", str(cli_files / "test.jsonl")]) == 2
    assert "77" in capsys.readouterr().err
    assert _cli(["--pred", str(cli_files / "nope.jsonl"), "--refs", str(cli_files / "test.jsonl")]) == 2
    assert "nope.jsonl" in capsys.readouterr().err
    (cli_files / "bad.jsonl").write_text('{"image_id": 1, "caption": "x"}\nnot json\n', encoding="utf-8")
    assert _cli(["--pred", str(cli_files / "bad.jsonl"), "--refs", str(cli_files / "test.jsonl")]) == 2
    assert "bad.jsonl: line 2" in capsys.readouterr().err


def test_module_main_subprocess(cli_files):
    proc = subprocess.run(
        [sys.executable, "-m", "jpcap_helpers.cli", "evaluate",
         "--pred", str(cli_files / "partial.jsonl"), "--refs", str(cli_files / "test.jsonl")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "have no prediction" in proc.stderr and "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- metrics.csv


def test_metrics_csv_append_keeps_rows_and_unions_columns(tmp_path):
    csv_path = tmp_path / "results" / "metrics.csv"
    refs, preds = _scored_corpus(n=12)
    result = ev.score(refs, preds, n_resamples=50)
    row1 = ev.metrics_row(result, model_id="Qwen/Qwen2-VL-2B-Instruct", split="val", revision="abc",
                          params_hash="p1", split_hash="s1")
    ev.append_metrics_row(csv_path, row1)
    row2 = ev.metrics_row(result, model_id="Qwen/Qwen2-VL-2B-Instruct", split="val", revision="abc",
                          adapter="runs/lora1", params_hash="p2", split_hash="s1", lora_rank=16, note="a, \"b\"")
    ev.append_metrics_row(csv_path, row2)
    ev.append_metrics_row(csv_path, {"model_id": "m3", "split": "test", "CIDEr": 0.5})

    df = ev.read_metrics(csv_path)
    assert len(df) == 3
    for col in ("model_id", "revision", "adapter", "params_hash", "split_hash", "git_commit", "date",
                "BLEU-4", "BLEU-4_lo", "BLEU-4_hi", "CIDEr", "n_images", "lora_rank", "note"):
        assert col in df.columns, col
    assert list(df["adapter"]) == ["", "runs/lora1", ""]
    assert df.loc[0, "BLEU-4"] == pytest.approx(result["BLEU-4"], rel=1e-15)
    assert df.loc[0, "CIDEr_lo"] == pytest.approx(result["ci"]["CIDEr"][0], rel=1e-15)
    assert math.isnan(df.loc[0, "lora_rank"]) and df.loc[1, "lora_rank"] == 16
    assert df.loc[1, "note"] == 'a, "b"'
    assert df.loc[2, "CIDEr"] == 0.5 and math.isnan(df.loc[2, "BLEU-4"])
    assert list(df.columns[:8]) == list(ev.PROVENANCE_COLUMNS)
    assert not list(csv_path.parent.glob(".*.tmp"))  # atomic write leaves no temp files
    latest = ev.read_metrics(csv_path, latest_only=True)
    assert len(latest) == 3  # rows differ in adapter / model / split


def test_git_commit_outside_repo(tmp_path):
    assert ev.git_commit(tmp_path) == "unknown"
    assert isinstance(ev.git_commit(), str) and ev.git_commit()


# ---------------------------------------------------------------------------------------------
# several runs side by side (04's last table)
# ---------------------------------------------------------------------------------------------

def _fake_result(cider: float) -> dict:
    from jpcap_helpers.evaluate import METRICS
    out = {m: 0.1 for m in METRICS}
    out.update({"CIDEr": cider, "n_images": 50})
    out["ci"] = {m: [out[m] - 0.05, out[m] + 0.05] for m in METRICS}
    return out


def _write_run(run_dir, rows):
    from jpcap_helpers.evaluate import append_metrics_row, metrics_row
    for model_id, split, cider, split_hash, system in rows:
        append_metrics_row(run_dir / "metrics.csv", metrics_row(_fake_result(cider), model_id=model_id, split=split,
                                                                split_hash=split_hash, system=system))


def test_compare_runs_puts_runs_side_by_side_and_flags_other_images(tmp_path, capsys):
    from jpcap_helpers.evaluate import EvaluationError, compare_runs
    qwen2, qwen3 = tmp_path / "colab_t4", tmp_path / "colab_t4_qwen3"
    _write_run(qwen2, [("qwen2-vl-2b-instruct", "test", 0.50, "h-test", "qwen2-vl-2b-instruct"),
                       ("qwen2-vl-2b-instruct", "test", 0.60, "h-test", "qwen2-vl-2b-instruct"),  # a rerun: latest kept
                       ("qwen2-vl-2b-instruct", "yj_test", 0.30, "h-yj", "qwen2-vl-2b-instruct")])
    _write_run(qwen3, [("qwen3-vl-2b-instruct", "test", 0.90, "h-test", "qwen3-vl-2b-instruct"),
                       ("qwen3-vl-2b-instruct", "yj_test", 0.20, "h-yj-other", "qwen3-vl-2b-instruct")])
    table = compare_runs([qwen2, qwen3])
    assert table[["Run", "Model", "Split"]].values.tolist() == [
        ["colab_t4_qwen3", "qwen3-vl-2b-instruct", "test"], ["colab_t4", "qwen2-vl-2b-instruct", "test"],
        ["colab_t4", "qwen2-vl-2b-instruct", "yj_test"], ["colab_t4_qwen3", "qwen3-vl-2b-instruct", "yj_test"]]
    assert table["CIDEr"].str.startswith(("0.900", "0.600", "0.300", "0.200")).all()
    assert table["same images"].tolist() == [True, True, True, False]
    assert "colab_t4_qwen3 (yj_test) scored other images" in capsys.readouterr().out
    only_test = compare_runs([qwen2, qwen3], splits=["test"])
    assert set(only_test["Split"]) == {"test"} and only_test["same images"].all()
    with pytest.raises(EvaluationError, match="run 04 .* for that run first"):
        compare_runs([qwen2, tmp_path / "never_evaluated"])


def test_sibling_runs_refuses_paths(tmp_path):
    from jpcap_helpers.evaluate import EvaluationError, sibling_runs
    run = tmp_path / "outputs" / "colab_t4"
    assert sibling_runs(run, ["colab_t4_qwen3"]) == [run, tmp_path / "outputs" / "colab_t4_qwen3"]
    for bad in ("../secrets", "a/b", "..", "", str(tmp_path), "..\\x"):
        with pytest.raises(EvaluationError, match="not a run name"):
            sibling_runs(run, [bad])
