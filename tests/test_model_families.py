"""Every family in the registry: native ones as tiny random models built with the real transformers
classes (saved, reloaded through the Auto classes, captioned in a batch of 2 through the engine);
remote-code ones through their prompt builder and output cleaner on hand-written strings."""
from __future__ import annotations

import json

import pytest
import torch

from jpcap_helpers import engine
from jpcap_helpers import io as jio
from jpcap_helpers.data import toy as toydata
from jpcap_helpers.engine import decode, generation
from jpcap_helpers.models import (
    CAPTION_PROMPT_JA,
    QWEN2_VL_CHAT_TEMPLATE,
    QWEN2_VL_SPECIAL_TOKENS,
    REGISTRY,
    ModelError,
    train_tiny_tokenizer,
)

NATIVE_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "paligemma")
PORTED_FAMILIES = ("llava_jp", "asagi")  # this package's ports: tests/test_llava_jp.py, tests/test_asagi.py
REMOTE_FAMILIES = ("stable_vlm",)  # hub code in a pinned environment: tests/test_pinned_env.py
HIDDEN = 64


def entry_for(family: str):
    return next(e for e in REGISTRY.values() if e.family == family and e.key != "tiny-qwen2-vl")


def test_registry_covers_the_families_tested_here():
    families = {e.family for e in REGISTRY.values()}
    assert families == set(NATIVE_FAMILIES) | set(PORTED_FAMILIES) | set(REMOTE_FAMILIES)
    for e in REGISTRY.values():
        assert (e.loader == "pinned_env") == (e.family in REMOTE_FAMILIES), e.key


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("fam")
    toydata.generate_jp_shapes(root / "data", n_train=8, n_val=6, n_yj=2)
    val = json.loads((root / "data" / "stair_captions_v1.2_val.json").read_text(encoding="utf-8"))
    sizes = {}
    records = []
    for im in val["images"]:  # two images of different sizes: the Qwen batch needs padding
        if (im["width"], im["height"]) not in sizes:
            sizes[(im["width"], im["height"])] = im["id"]
            records.append({"image_id": im["id"], "file_name": f"val2014/{im['file_name']}"})
        if len(records) == 2:
            break
    assert len(records) == 2
    return {"root": root, "data": root / "data", "texts": toydata.all_caption_texts(root / "data"),
            "records": records}


def _scramble(model, seed=0, std=0.3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def _qwen_text_config(tok, ids, **extra):
    cfg = dict(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-6,
               rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
               bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    cfg.update(extra)
    return cfg


def build_qwen_family(family: str, out_dir, texts):
    """A tiny Qwen2-VL / Qwen2.5-VL / Qwen3-VL with the real config, model and processor classes."""
    import transformers as tf

    tok = train_tiny_tokenizer(texts, 500)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN2_VL_SPECIAL_TOKENS}
    special = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                   vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    vision = dict(depth=2, num_heads=2, in_channels=3, spatial_merge_size=2, temporal_patch_size=2)
    if family == "qwen2_vl":
        patch = 14
        cfg = tf.Qwen2VLConfig(text_config=_qwen_text_config(tok, ids), tie_word_embeddings=True, **special,
                               vision_config=dict(vision, embed_dim=32, mlp_ratio=2, hidden_size=HIDDEN, patch_size=patch))
        model_cls, proc_cls, video_cls = tf.Qwen2VLForConditionalGeneration, tf.Qwen2VLProcessor, "Qwen2VLVideoProcessor"
    elif family == "qwen2_5_vl":
        patch = 14
        cfg = tf.Qwen2_5_VLConfig(text_config=_qwen_text_config(tok, ids), tie_word_embeddings=True, **special,
                                  vision_config=dict(vision, hidden_size=32, intermediate_size=64, out_hidden_size=HIDDEN,
                                                     patch_size=patch, window_size=56, fullatt_block_indexes=[1]))
        model_cls, proc_cls, video_cls = (tf.Qwen2_5_VLForConditionalGeneration, tf.Qwen2_5_VLProcessor,
                                          "Qwen2VLVideoProcessor")
    else:
        patch = 16
        text = _qwen_text_config(tok, ids, head_dim=16, rope_parameters={
            "rope_type": "default", "rope_theta": 5e5, "mrope_section": [2, 3, 3], "mrope_interleaved": True})
        cfg = tf.Qwen3VLConfig(text_config=text, tie_word_embeddings=True, **special,
                               vision_config=dict(vision, hidden_size=32, intermediate_size=64, out_hidden_size=HIDDEN,
                                                  patch_size=patch, num_position_embeddings=64,
                                                  deepstack_visual_indexes=[0]))
        model_cls, proc_cls, video_cls = tf.Qwen3VLForConditionalGeneration, tf.Qwen3VLProcessor, "Qwen3VLVideoProcessor"
    torch.manual_seed(0)
    model = model_cls(cfg)
    model.generation_config.eos_token_id = [ids["<|im_end|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    image_processor = tf.Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=patch)
    try:
        video_processor = getattr(tf, video_cls)()
    except Exception:  # needs torchvision; captions never use it
        video_processor = None
    processor = proc_cls(image_processor=image_processor, tokenizer=tok, video_processor=video_processor,
                         chat_template=QWEN2_VL_CHAT_TEMPLATE)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


def build_paligemma(out_dir, texts):
    """A tiny PaliGemma: Gemma-style special tokens (<pad> 0, <eos> 1, <bos> 2), SigLIP vision tower."""
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts + ["caption ja"] * 20, trainer=trainers.BpeTrainer(
        vocab_size=400, min_frequency=2, show_progress=False, max_token_length=6,
        special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                     unk_token="<unk>", padding_side="left", clean_up_tokenization_spaces=False)
    image_processor = tf.SiglipImageProcessor(size={"height": 28, "width": 28}, image_seq_length=4)
    processor = tf.PaliGemmaProcessor(image_processor=image_processor, tokenizer=tok)  # adds <image>, <locNNNN>…
    cfg = tf.PaliGemmaConfig(
        text_config=dict(model_type="gemma", vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                         pad_token_id=0, bos_token_id=2, eos_token_id=1),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14,
                           projection_dim=HIDDEN),
        image_token_id=tok.convert_tokens_to_ids("<image>"), projection_dim=HIDDEN, hidden_size=HIDDEN)
    torch.manual_seed(0)
    model = tf.PaliGemmaForConditionalGeneration(cfg)
    model.generation_config.eos_token_id = 1
    model.generation_config.pad_token_id = 0
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


EXPECTED_CLASSES = {
    "qwen2_vl": ("Qwen2VLForConditionalGeneration", "Qwen2VLProcessor"),
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor"),
    "qwen3_vl": ("Qwen3VLForConditionalGeneration", "Qwen3VLProcessor"),
    "paligemma": ("PaliGemmaForConditionalGeneration", "PaliGemmaProcessor"),
}


@pytest.mark.parametrize("family", NATIVE_FAMILIES)
def test_native_family_loads_and_captions_a_batch(family, shapes, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model_dir = tmp_path / family
    if family == "paligemma":
        build_paligemma(model_dir, shapes["texts"])
    else:
        build_qwen_family(family, model_dir, shapes["texts"])
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    assert (type(model).__name__, type(processor).__name__) == EXPECTED_CLASSES[family]
    _scramble(model)
    entry = entry_for(family)

    prompt = engine.build_prompt(entry, processor)
    if family == "paligemma":
        assert prompt == "<image>caption ja"
        ids = processor(text=[prompt], images=[_blank()],
                        return_tensors="pt")["input_ids"][0].tolist()
        tokens = processor.tokenizer.convert_ids_to_tokens(ids)
        assert tokens[:5] == ["<image>"] * 4 + ["<bos>"] and tokens[-1] == "Ċ"  # image tokens, BOS, prefix, "\n"
    else:
        assert "<|vision_start|><|image_pad|><|vision_end|>" + CAPTION_PROMPT_JA in prompt
        assert prompt.endswith("<|im_start|>assistant\n")

    batched = engine.caption_records(model, processor, entry, shapes["records"], shapes["data"],
                                     tmp_path / "b.jsonl", batch_size=2, max_new_tokens=6, progress=False)
    engine.caption_records(model, processor, entry, shapes["records"], shapes["data"],
                           tmp_path / "s.jsonl", batch_size=1, max_new_tokens=6, progress=False)
    assert batched["n_captioned"] == 2 and batched["n_errors"] == 0
    rows = list(jio.read_jsonl(tmp_path / "b.jsonl"))
    assert sorted(r["image_id"] for r in rows) == sorted(r["image_id"] for r in shapes["records"])
    assert all(r["model"] == entry.key and isinstance(r["caption"], str) for r in rows)
    assert any(r["caption"] for r in rows), "the scrambled model should emit some text"
    single_rows = {r["image_id"]: r["caption"] for r in jio.read_jsonl(tmp_path / "s.jsonl")}
    assert {r["image_id"]: r["caption"] for r in rows} == single_rows
    fast = family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")  # the static-cache greedy decoder's families
    assert batched["decoder"] == ("static-cache greedy" if fast else "hf generate")
    if fast:
        hf = engine.caption_records(model, processor, entry, shapes["records"], shapes["data"], tmp_path / "h.jsonl",
                                    batch_size=2, max_new_tokens=6, progress=False, decoder="hf")
        assert hf["decoder"] == "hf generate"
        assert {r["image_id"]: r["caption"] for r in jio.read_jsonl(tmp_path / "h.jsonl")} == single_rows
        # the decoder's own prefill (a lever to measure) on this family too
        im = engine.load_image_for_model(shapes["data"] / shapes["records"][0]["file_name"])
        inputs = generation.prepare_inputs(processor, [prompt], [im])
        model_prefill = decode.GreedyDecoder(model, eos_ids=[], pad_id=0, max_batch=1).generate(inputs, 6)
        own_prefill = decode.GreedyDecoder(model, eos_ids=[], pad_id=0, max_batch=1, prefill="own").generate(inputs, 6)
        assert torch.equal(model_prefill, own_prefill)


def _blank():
    from PIL import Image

    return Image.new("RGB", (40, 30), (200, 10, 10))


# ------------------------------------------------------------------------------------------------
# remote-code families: prompts and cleaners only (their code cannot be fetched or run here)
# ------------------------------------------------------------------------------------------------

def test_pinned_env_entries_do_not_caption_in_this_process(tmp_path):
    for family in REMOTE_FAMILIES:
        with pytest.raises(ModelError, match="pinned environment"):
            engine.caption_records(None, None, entry_for(family), [], tmp_path, tmp_path / "x.jsonl")


def test_llava_jp_prompt_and_cleaner():
    e = entry_for("llava_jp")
    prompt = engine.build_prompt(e, None)
    assert prompt == ("これは好奇心旺盛なユーザーと人工知能システムのチャットです。"
                      "システムはユーザーの質問に親切、詳細、丁寧に答える。 ユーザー: <image>\n"
                      "この画像を日本語の一文で説明してください。 システム: ")
    assert engine.build_prompt(e, None, instruction="何が見えますか？").endswith(
        "ユーザー: <image>\n何が見えますか？ システム: ")
    assert engine.clean_output(e, prompt.replace("<image>", "") + "犬が走っている。<EOD|LLM-jp>") == "犬が走っている。"
    assert engine.clean_output(e, " 犬が走っている。 ユーザー: 次は？") == "犬が走っている。"
    assert engine.clean_output(e, "システム: 猫が寝ている。</s>") == "猫が寝ている。"


def test_asagi_prompt_and_cleaner():
    e = entry_for("asagi")
    prompt = engine.build_prompt(e, None)
    assert prompt == ("以下は、タスクを説明する指示です。要求を適切に満たす応答を書きなさい。\n\n"
                      "### 指示:\n<image>\nこの画像を日本語の一文で説明してください。\n\n### 応答:\n")
    assert engine.build_prompt(e, None, instruction=CAPTION_PROMPT_JA) == prompt
    # the model card decodes the whole sequence, prompt included
    full = prompt.replace("<image>", "") + "男性が自転車に乗っている。\n\n### 指示:\n次の画像"
    assert engine.clean_output(e, full) == "男性が自転車に乗っている。"
    assert engine.clean_output(e, "  二匹の猫がソファにいる。</s>") == "二匹の猫がソファにいる。"


def test_stable_vlm_prompt_and_cleaner():
    e = entry_for("stable_vlm")
    prompt = engine.build_prompt(e, None)
    assert prompt == ("以下は、タスクを説明する指示と、文脈のある入力の組み合わせです。要求を適切に満たす応答を書きなさい。"
                      "\n\n### 指示: \n画像を詳細に述べてください。\n\n### 応答: \n")
    assert "<image>" not in prompt  # the model prepends the image itself
    vqa = engine.build_prompt(e, None, instruction="何色ですか？")
    assert vqa.endswith("### 指示: \n与えられた画像を下に、質問に答えてください。\n\n### 入力: \n何色ですか？\n\n### 応答: \n")
    assert engine.clean_output(e, "男は車の上で洗濯をしている\n\n### 指示: \nまた") == "男は車の上で洗濯をしている"
    assert engine.clean_output(e, prompt + "赤い車。<|endoftext|>") == "赤い車。"


def test_native_cleaners_on_hand_written_strings():
    qwen, pali = entry_for("qwen2_vl"), entry_for("paligemma")
    assert engine.clean_output(qwen, "犬がいる。<|im_end|>\n<|im_start|>user\n") == "犬がいる。"
    assert engine.clean_output(qwen, "system\nYou are a helpful assistant.\nuser\n説明して\nassistant\n犬がいる。") == "犬がいる。"
    assert engine.clean_output(qwen, "  白い皿の上のケーキ。\n") == "白い皿の上のケーキ。"
    assert engine.clean_output(pali, "caption ja\n公園で遊ぶ子供たち<eos>") == "公園で遊ぶ子供たち"
    assert engine.clean_output(pali, "公園で遊ぶ子供たち") == "公園で遊ぶ子供たち"
    with pytest.raises(ModelError, match="processor"):
        engine.build_prompt(qwen, None)


def test_contamination_flags_follow_the_registry():
    assert engine.contamination_flag(REGISTRY["asagi-2b"]) == "contaminated"
    assert engine.contamination_flag(REGISTRY["japanese-stable-vlm"]) == "contaminated"
    assert engine.contamination_flag(REGISTRY["llava-jp-1.3b"]) == "clean"
    assert engine.contamination_flag(REGISTRY["qwen2-vl-2b-instruct"]) == "unknown"
