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
    from jpcap_helpers.toydata import generate_jp_shapes

    root = tmp_path_factory.mktemp("jp-shapes")
    generate_jp_shapes(root, n_train=60, n_val=30, n_yj=20, seed=0)
    return root


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, toy_root) -> Path:
    """The tiny Qwen2-VL built from the toy captions (saved, loadable with from_pretrained)."""
    from jpcap_helpers.models import build_tiny_model
    from jpcap_helpers.toydata import all_caption_texts

    out = tmp_path_factory.mktemp("tiny-model") / "tiny-qwen2-vl"
    return build_tiny_model(out, all_caption_texts(toy_root), max_pixels=112 * 112)
