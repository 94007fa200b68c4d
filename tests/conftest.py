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
