"""Shared fixtures. Tests never touch the network: the hub is switched off before anything imports it."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def project_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory) -> Path:
    """A small jp-shapes data set shared by the tests of a session."""
    from jpcap_helpers.data import generate_jp_shapes

    root = tmp_path_factory.mktemp("jp-shapes")
    generate_jp_shapes(root, n_train=60, n_val=30, n_yj=20, seed=0)
    return root


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, toy_root) -> Path:
    """The tiny Qwen2-VL built from the toy captions (saved, loadable with from_pretrained)."""
    from jpcap_helpers.data import all_caption_texts
    from jpcap_helpers.models import build_tiny_model

    out = tmp_path_factory.mktemp("tiny-model") / "tiny-qwen2-vl"
    return build_tiny_model(out, all_caption_texts(toy_root), max_pixels=112 * 112)


def qwen2_vl_2b_config(tok):
    """Qwen2-VL-2B-Instruct's architecture (benchmarks/qwen_vl_configs.json) with the special-token ids of
    ``tok`` (the tiny tokenizer), for GPU tests of the real shape with random weights."""
    from transformers import Qwen2VLConfig

    from jpcap_helpers.models import QWEN2_VL_SPECIAL_TOKENS

    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN2_VL_SPECIAL_TOKENS}
    text = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
                tie_word_embeddings=True,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    vision = dict(depth=32, embed_dim=1280, mlp_ratio=4, num_heads=16, in_channels=3, hidden_size=1536,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True,
                         image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                         vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])


def build_tiny_qwen_vl(family: str, out: Path, texts: list[str], seed: int = 0) -> Path:
    """A tiny Qwen2.5-VL or Qwen3-VL with the real transformers classes (config, model, processor), saved
    in the hub layout, with the toy captions' tokenizer (Qwen2-VL's special tokens and chat template).
    Qwen3-VL: 3 language layers, a 3-block ViT with patch 16 and deepstack features from blocks 0 and 2
    (added after language layers 0 and 1), interleaved 3-D rotary. Qwen2.5-VL: 3 language layers, a
    2-block ViT with windows of 2×2 merged tokens (reordered inside the tower) and one full-attention block."""
    import torch
    import transformers as tf

    from jpcap_helpers.models import QWEN2_VL_CHAT_TEMPLATE, QWEN2_VL_SPECIAL_TOKENS, train_tiny_tokenizer

    tok = train_tiny_tokenizer(texts, 500)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN2_VL_SPECIAL_TOKENS}
    special = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                   vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                rms_norm_eps=1e-6, tie_word_embeddings=True,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    vision = dict(hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, in_channels=3,
                  spatial_merge_size=2, temporal_patch_size=2)
    if family == "qwen3_vl":
        patch = 16
        text.update(head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 5e5,
                                                  "mrope_section": [2, 3, 3], "mrope_interleaved": True})
        vision.update(depth=3, patch_size=patch, num_position_embeddings=64, deepstack_visual_indexes=[0, 2])
        cfg = tf.Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **special)
        model_cls, proc_cls, video = tf.Qwen3VLForConditionalGeneration, tf.Qwen3VLProcessor, "Qwen3VLVideoProcessor"
        mean_std = dict(image_mean=[0.5] * 3, image_std=[0.5] * 3)
    elif family == "qwen2_5_vl":
        patch = 14
        vision.update(depth=2, patch_size=patch, window_size=56, fullatt_block_indexes=[1])
        cfg = tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **special)
        model_cls, proc_cls, video = (tf.Qwen2_5_VLForConditionalGeneration, tf.Qwen2_5_VLProcessor,
                                      "Qwen2VLVideoProcessor")
        mean_std = {}
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = model_cls(cfg)
    model.generation_config.eos_token_id = [ids["<|im_end|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.do_sample = False
    image_processor = tf.Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=patch, **mean_std)
    try:
        video_processor = getattr(tf, video)()
    except Exception:  # needs torchvision; captions never use it
        video_processor = None
    processor = proc_cls(image_processor=image_processor, tokenizer=tok, video_processor=video_processor,
                         chat_template=QWEN2_VL_CHAT_TEMPLATE)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory, toy_root) -> Path:
    """The tiny Qwen3-VL (:func:`build_tiny_qwen_vl`) on the toy captions, built once per session."""
    from jpcap_helpers.data import all_caption_texts

    return build_tiny_qwen_vl("qwen3_vl", tmp_path_factory.mktemp("tiny-qwen3") / "tiny-qwen3-vl",
                              all_caption_texts(toy_root))


@pytest.fixture(scope="session")
def tiny_qwen25_dir(tmp_path_factory, toy_root) -> Path:
    """The tiny Qwen2.5-VL (:func:`build_tiny_qwen_vl`) on the toy captions, built once per session."""
    from jpcap_helpers.data import all_caption_texts

    return build_tiny_qwen_vl("qwen2_5_vl", tmp_path_factory.mktemp("tiny-qwen25") / "tiny-qwen2.5-vl",
                              all_caption_texts(toy_root))


# the config classes of the real checkpoints in benchmarks/qwen_vl_configs.json built by qwen_vl_real_config
REAL_CONFIG_CLASSES = {"Qwen/Qwen2.5-VL-3B-Instruct": "Qwen2_5_VLConfig", "Qwen/Qwen3-VL-2B-Instruct": "Qwen3VLConfig"}


def qwen_vl_real_config(hub_id: str, tok):
    """``hub_id``'s architecture (a key of :data:`REAL_CONFIG_CLASSES`, from benchmarks/qwen_vl_configs.json:
    its Qwen3-VL-2B values are noted there as unconfirmed) with the special-token ids of ``tok``, for GPU
    tests of the real shape with random weights."""
    import json

    import transformers

    from jpcap_helpers.models import QWEN2_VL_SPECIAL_TOKENS

    spec = json.loads((ROOT / "benchmarks" / "qwen_vl_configs.json").read_text())[hub_id]
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN2_VL_SPECIAL_TOKENS}
    text = dict(spec["text"])
    rope = {"rope_type": "default", "rope_theta": text.pop("rope_theta"), "mrope_section": text.pop("mrope_section")}
    if "mrope_interleaved" in text:   # Qwen3-VL
        rope["mrope_interleaved"] = text.pop("mrope_interleaved")
    text["rope_parameters"] = rope
    text.update(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    config_cls = getattr(transformers, REAL_CONFIG_CLASSES[hub_id])
    return config_cls(text_config=text, vision_config=dict(spec["vision"]), tie_word_embeddings=True,
                      image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                      vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])


def qwen3_vl_2b_config(tok):
    """:func:`qwen_vl_real_config` of Qwen3-VL-2B-Instruct."""
    return qwen_vl_real_config("Qwen/Qwen3-VL-2B-Instruct", tok)
