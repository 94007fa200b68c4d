"""Tests for jpcap_helpers.text: normaliser, token truncation, MeCab segmentation."""
from __future__ import annotations

import pytest

from jpcap_helpers.text import (
    NormalizeStats,
    is_japanese_char,
    normalize_caption,
    segment,
    segment_many,
    truncate_to_tokens,
)

# --------------------------------------------------------------------------- normaliser


def test_zenkaku_ascii_to_hankaku():
    assert normalize_caption("ＡＢＣ１２３") == "ABC123"


def test_halfwidth_kana_to_fullwidth():
    assert normalize_caption("ｶﾒﾗ") == "カメラ"
    assert normalize_caption("ｺｰﾋｰ") == "コーヒー"  # half-width prolonged mark and voiced mark


def test_emoji_removed():
    assert normalize_caption("犬が走っている😀") == "犬が走っている"
    assert normalize_caption("猫👍🏻が❤️いる") == "猫がいる"  # skin tone + variation selector
    assert normalize_caption("⭐星") == "星"


def test_control_and_zero_width_removed():
    assert normalize_caption("犬\u200bが\u200d走る\ufeff") == "犬が走る"
    assert normalize_caption("cat\x00dog") == "catdog"
    assert normalize_caption("a\u00adb") == "ab"  # soft hyphen (Cf)


def test_spaces_between_japanese_removed_latin_kept():
    assert normalize_caption("犬 が　公園 で 走る") == "犬が公園で走る"
    assert normalize_caption("  a   red\tcar \n") == "a red car"
    assert normalize_caption("赤い car が ある") == "赤い car がある"
    assert normalize_caption("テニス 、 ボール") == "テニス、ボール"


def test_punctuation_mapping():
    assert normalize_caption("犬，猫．") == "犬、猫。"
    assert normalize_caption("犬,猫.") == "犬、猫。"
    assert normalize_caption("犬が走る .") == "犬が走る。"
    assert normalize_caption("ｷﾘﾝ｡") == "キリン。"
    assert normalize_caption("犬…") == "犬..."
    assert normalize_caption("犬・・・") == "犬..."
    assert normalize_caption("“ゾウ”") == '"ゾウ"'
    assert normalize_caption("東京～大阪") == "東京〜大阪"
    assert normalize_caption("A—B") == "A-B"
    # the katakana long-vowel mark is not a dash
    assert normalize_caption("スーパー") == "スーパー"


def test_punctuation_keeps_decimals_and_latin():
    assert normalize_caption("3.5メートル") == "3.5メートル"
    assert normalize_caption("1,000円の犬") == "1,000円の犬"
    assert normalize_caption("Mr. Smith, hello.") == "Mr. Smith, hello."
    assert normalize_caption("ver.2の画面") == "ver.2の画面"


def test_stats_counts_captions_per_kind():
    stats = NormalizeStats()
    captions = [
        "犬が走っている。",  # unchanged
        "ＡＢＣ",  # nfkc
        "犬😀",  # emoji
        "犬\u200bが",  # control
        "犬 が",  # spaces
        "犬，猫",  # nfkc (， -> ,) then punctuation (, -> 、)
        "ＡＢＣ ＡＢＣ",  # nfkc only: the space between Latin letters stays
    ]
    for c in captions:
        normalize_caption(c, stats)
    d = stats.as_dict()
    assert d == {
        "total": 7,
        "changed": 6,
        "control": 1,
        "emoji": 1,
        "nfkc": 3,
        "punctuation": 1,
        "spaces": 1,
    }


def test_stats_merge():
    a, b = NormalizeStats(), NormalizeStats()
    normalize_caption("ＡＢＣ", a)
    normalize_caption("犬 が", b)
    a += b
    assert a.total == 2 and a.nfkc == 1 and a.spaces == 1 and a.changed == 2


@pytest.mark.parametrize(
    "text",
    [
        "ＡＢＣ１２３ ｶﾒﾗ 😀\u200b 犬 ，猫．．",
        "。 。 ・ ・ ・",
        "犬 . . 猫",
        "  , ,犬,, ",
        "…公，.ﾗ」",
        "3 . 5 と 1 , 000",
        "",
    ],
)
def test_idempotent(text):
    once = normalize_caption(text)
    stats = NormalizeStats()
    assert normalize_caption(once, stats) == once
    assert stats.changed == 0


def test_idempotent_random_strings():
    import random

    alphabet = list("犬の公園カメラｶﾒﾗ ＡＢＣ１２abc3.5,，．.。、…‥・～〜~ー－―“”\u200b\u3000\t😀👍🏻❤️1️⃣!！?（）「」")
    rng = random.Random(1234)
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14)))
        once = normalize_caption(text)
        assert normalize_caption(once) == once, repr(text)


def test_rejects_non_string():
    with pytest.raises(TypeError):
        normalize_caption(None)  # type: ignore[arg-type]


def test_is_japanese_char():
    assert all(is_japanese_char(c) for c in "犬がカ。、ー々")
    assert not any(is_japanese_char(c) for c in "a1.,! ")


# --------------------------------------------------------------------------- truncation


@pytest.fixture(scope="module")
def byte_level_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [
        "犬が公園で走っている。",
        "猫がソファの上で寝ている。",
        "男性が自転車に乗っている。",
        "テーブルの上にピザが置かれている。",
    ] * 5
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def test_tokenizer_really_splits_characters(byte_level_tokenizer):
    # Unseen kanji fall back to single bytes, so prefixes can end inside a character.
    text = "鳩と鷲と鷹"
    ids = byte_level_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text)
    assert "\ufffd" in byte_level_tokenizer.decode(ids[:1])


def test_truncate_never_yields_broken_chars(byte_level_tokenizer):
    for text in ["鳩と鷲と鷹が空を飛んでいる。", "犬が公園で走っている。鳩🕊も"]:
        ids = byte_level_tokenizer(text, add_special_tokens=False)["input_ids"]
        for k in range(len(ids) + 2):
            out, truncated = truncate_to_tokens(text, byte_level_tokenizer, k)
            assert "\ufffd" not in out
            assert text.startswith(out), (k, out)
            assert truncated == (k < len(ids))
            n_out = len(byte_level_tokenizer(out, add_special_tokens=False)["input_ids"]) if out else 0
            assert n_out <= k


def test_truncate_short_text_unchanged(byte_level_tokenizer):
    assert truncate_to_tokens("犬", byte_level_tokenizer, 50) == ("犬", False)


def test_truncate_rejects_negative(byte_level_tokenizer):
    with pytest.raises(ValueError):
        truncate_to_tokens("犬", byte_level_tokenizer, -1)


# --------------------------------------------------------------------------- segmentation


def test_segment_known_sentence():
    tokens = segment("犬が公園で走っている。")
    for t in ["犬", "が", "公園", "で"]:
        assert t in tokens
    assert "。" not in tokens
    assert "".join(tokens) == "犬が公園で走っている"


def test_segment_drops_symbols_and_spaces():
    tokens = segment("「赤い」車 、 青い車！")
    assert not any(t in tokens for t in ["「", "」", "、", "！", " ", "\u3000"])
    assert "赤い" in tokens and "車" in tokens
    assert segment("") == []
    assert segment("。、！？") == []


def test_segment_many():
    assert segment_many(["犬が走る", "猫"]) == [segment("犬が走る"), segment("猫")]
