"""Automatic failure flags on hand-written Japanese cases (MeCab via fugashi + unidic-lite)."""
import math

import pytest

from jpcap_helpers.analysis import flags as F

REFS_PERSON_DOG = ["人が犬と公園を歩いている", "犬を連れた人が公園にいる", "公園で犬と散歩する人"]


def raised(pred, refs=REFS_PERSON_DOG):
    r = F.flag_caption(pred, refs)
    return {f for f in F.FLAGS if r[f]}, r


# ---- gendered terms -------------------------------------------------------------------------

def test_gendered_term_against_gender_neutral_references():
    got, r = raised("男性が犬と公園にいる")
    assert "gendered" in got
    assert r["gender_terms"] == ["男性"]
    assert r["gender_reason"] == "neutral_refs"


def test_gender_supported_by_most_references_is_not_flagged():
    refs = ["男性が立っている", "男の人が立っている", "人が立っている"]
    flagged, terms, _ = F.gender_flag("男性が立っている", refs)
    assert terms == ["男性"] and not flagged


def test_gender_contradicting_or_disputed_references():
    assert F.gender_flag("男の子が走っている", ["女の子が走っている", "少女が走る"])[2] == "contradicts_refs"
    flagged, _, reason = F.gender_flag("女性が座っている", ["女性が座っている", "男性が座っている", "人が座っている"])
    assert flagged and reason == "refs_disagree"


@pytest.mark.parametrize("text,expected", [
    ("おじさんが座っている", [("おじさん", "male")]),          # おじ + さん: a run of tokens
    ("お母さんと娘", [("お母さん", "female"), ("娘", "female")]),
    ("男の人と女の子", [("男の人", "male"), ("女の子", "female")]),
    ("彼女は笑っている", [("彼女", "female")]),                # not 彼 (male)
])
def test_gender_terms_match_whole_tokens_longest_first(text, expected):
    assert [(t, g) for t, g in F.gender_terms(text) if g] == expected


@pytest.mark.parametrize("text", ["彼らは公園にいる", "大丈夫な犬", "工夫された料理", "男女が集まっている"])
def test_no_gender_inside_other_words_or_for_groups(text):
    assert not F.gender_flag(text, ["人がいる"])[0]


# ---- non-Japanese ---------------------------------------------------------------------------

@pytest.mark.parametrize("text,kind", [
    ("A man is walking", "latin"),
    ("一个男人在街上走", "chinese"),
    ("한 남자가 걷고 있다", "other_script"),
    ("12345", "no_letters"),
])
def test_non_japanese_output(text, kind):
    got, r = raised(text)
    assert "non_japanese" in got and r["script"] == kind


@pytest.mark.parametrize("text", ["犬が歩いている", "カメラを持つ人", "犬とfrisbee", "公園で遊ぶ犬"])
def test_japanese_output_is_not_flagged_non_japanese(text):
    assert "non_japanese" not in raised(text)[0]


# ---- repetition -----------------------------------------------------------------------------

@pytest.mark.parametrize("text,unit", [
    ("猫猫猫猫猫猫", "猫 ×6"),
    ("犬が走っている犬が走っている犬が走っている", "犬 が 走っ て いる ×3"),
    ("赤い丸、赤い丸、赤い丸、赤い丸", "赤い 丸 ×4"),
])
def test_repetition_loops(text, unit):
    got, r = raised(text)
    assert "repetition" in got and r["repeated"] == unit


@pytest.mark.parametrize("text", ["犬が走っている", "犬と犬が遊んでいる", "いろいろな色の丸"])
def test_no_repetition_in_ordinary_captions(text):
    assert "repetition" not in raised(text)[0]


# ---- hallucinated nouns ---------------------------------------------------------------------

def test_noun_in_no_reference_is_hallucinated_and_listed():
    got, r = raised("犬とテーブルが公園にある")
    assert "hallucination" in got
    assert r["hallucinated_nouns"] == ["テーブル"]
    assert r["n_nouns"] == 3 and r["n_hallucinated"] == 1      # 犬, テーブル, 公園


def test_nouns_found_by_lemma_or_substring_or_ignored_are_not_hallucinated():
    refs = ["子犬と猫の写真", "三匹の動物がいる"]
    assert F.hallucinated_nouns("ねこがいる", refs)[0] == []        # lemma ねこ → 猫
    assert F.hallucinated_nouns("犬が二匹いる", refs)[0] == []       # 犬 inside 子犬; 二 is a number
    assert F.hallucinated_nouns("真ん中の写真", ["赤い丸"])[0] == []  # positions and "photo" never count
    assert F.hallucinated_nouns("彼がいる", ["赤い丸"])[0] == []      # a pronoun, not a noun in unidic


# ---- empty and over-long --------------------------------------------------------------------

@pytest.mark.parametrize("text", ["", "   ", "。。、", "\ufffd\ufffd\ufffd"])
def test_empty_predictions(text):
    got, _ = raised(text)
    assert got == {"empty"}


def test_overlong_is_more_than_twice_the_longest_reference_in_mecab_tokens():
    refs = ["赤い丸", "赤い丸がある"]          # longest: 赤い/丸/が/ある = 4 tokens
    short = "大きな赤い丸がある"                # 5 tokens
    long = "大きな赤い丸と小さな青い丸と黄色い星がある"
    assert not F.flag_caption(short, refs)["overlong"]
    r = F.flag_caption(long, refs)
    assert r["max_ref_tokens"] == 4 and r["n_tokens"] > 8 and r["overlong"]


# ---- per model ------------------------------------------------------------------------------

def test_flag_predictions_and_rates_per_model():
    refs = {1: REFS_PERSON_DOG, 2: REFS_PERSON_DOG, 3: REFS_PERSON_DOG, 4: REFS_PERSON_DOG}
    a = F.flag_predictions({1: "人が犬と公園を歩いている", 2: "男性が犬と公園にいる", 3: "", 4: "A man"}, refs, "A")
    b = F.flag_predictions({1: "犬と猫と鳥", 2: "人が犬と歩いている", 99: "no references"}, refs, "B")
    assert list(a["image_id"]) == [1, 2, 3, 4] and list(b["image_id"]) == [1, 2]   # 99 skipped
    assert a.loc[a.image_id == 2, "flags"].item() == ["hallucination", "gendered"]
    import pandas as pd

    rates = F.flag_rates(pd.concat([a, b])).set_index("model")
    assert rates.loc["A", "n_images"] == 4 and rates.loc["A", "gendered"] == 0.25
    assert rates.loc["A", "empty"] == 0.25 and rates.loc["A", "non_japanese"] == 0.25
    # B: image 1 names 猫 and 鳥 (absent) and 犬 (present); image 2 none
    assert rates.loc["B", "hallucination"] == 0.5
    assert math.isclose(rates.loc["B", "hallucinated_noun_rate"], 2 / 5)   # 犬 猫 鳥 | 人 犬
    nouns = F.hallucinated_noun_table(b)
    assert set(nouns["noun"]) == {"猫", "鳥"}


def test_ethics_summary_cites_the_rates():
    df = F.flag_predictions({1: "男性が犬と公園にいる", 2: "人が犬といる"}, {1: REFS_PERSON_DOG, 2: REFS_PERSON_DOG}, "M")
    rates = F.flag_rates(df)
    text = F.ethics_summary(rates, F.hallucinated_noun_table(df), split="test")
    for concern in ("Hallucination", "Cultural bias", "Gender bias", "Privacy"):
        assert concern in text
    assert "M 50.0% (1)" in text           # gendered: 1 of 2 images
    assert "face detection" in text
