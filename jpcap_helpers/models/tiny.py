"""The offline tiny Qwen2-VL: built with the real transformers classes from a config, a byte-level BPE
tokenizer trained on the toy captions (with Qwen2-VL's special tokens and chat template) and the
real Qwen2-VL image processor, then saved so ``from_pretrained`` loads it exactly as it loads a hub
checkpoint: both faces of the project share one code path. With ``model.tiny.pretrain_steps`` > 0 the
weights are pretrained on another captioning task of the toy world first (:mod:`.tiny_pretrain`), so the
demo adapts a pretrained base as the real run does; with 0 they stay random.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..io import atomic_write_json
from .qwen_vl import QWEN2_VL_CHAT_TEMPLATE, QWEN2_VL_SPECIAL_TOKENS
from .registry import CAPTION_PROMPT_JA, ModelError
from .tiny_pretrain import STAMP_FILE, architecture, pretrain_tiny_model

__all__ = ["TINY_KEY", "train_tiny_tokenizer", "tiny_config", "build_tiny_model", "tiny_model_dir",
           "ensure_tiny_model"]

TINY_KEY = "tiny-qwen2-vl"


def train_tiny_tokenizer(texts: list[str], vocab_size: int = 1200) -> Any:
    """A byte-level BPE tokenizer trained on ``texts`` with Qwen2-VL's special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # Japanese has no spaces, so unbounded merges would learn whole captions as single tokens; six
    # byte-level symbols = at most two kana/kanji per token, close to what Qwen's real vocabulary does.
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  max_token_length=6, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    scaffold = ["system", "user", "assistant", "You are a helpful assistant.", CAPTION_PROMPT_JA]
    tok.train_from_iterator(texts + scaffold * 50, trainer=trainer)
    tok.add_special_tokens(QWEN2_VL_SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token=None, additional_special_tokens=QWEN2_VL_SPECIAL_TOKENS[1:],
        model_max_length=32768, padding_side="left", clean_up_tokenization_spaces=False,
    )
    fast.chat_template = QWEN2_VL_CHAT_TEMPLATE
    return fast


def tiny_config(tok: Any, spec: Any) -> Any:
    """A Qwen2VLConfig at toy size whose special-token ids match ``tok``."""
    from transformers import Qwen2VLConfig

    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN2_VL_SPECIAL_TOKENS}
    head_dim = spec.hidden_size // spec.num_attention_heads
    half = head_dim // 2
    section = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
    text = dict(vocab_size=len(tok), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
                num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
                num_key_value_heads=spec.num_key_value_heads, max_position_embeddings=4096,
                rms_norm_eps=1e-6, tie_word_embeddings=True,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": section},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"])
    vision = dict(depth=spec.vision_depth, embed_dim=spec.vision_embed_dim, num_heads=spec.vision_num_heads,
                  mlp_ratio=2, hidden_size=spec.hidden_size, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, in_channels=3)
    return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True,
                         image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                         vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"])


def build_tiny_model(out_dir: str | Path, caption_texts: list[str], spec: Any = None, min_pixels: int = 56 * 56,
                     max_pixels: int = 448 * 448, overwrite: bool = False) -> Path:
    """Build (or reuse) the tiny Qwen2-VL in ``out_dir``: config, random weights, tokenizer, processor."""
    import hashlib

    import torch
    from transformers import Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor, Qwen2VLProcessor

    from ..params import TinyModelParams

    spec = spec or TinyModelParams()
    out_dir = Path(out_dir)
    fingerprint = hashlib.sha256(json.dumps(
        [architecture(spec), min_pixels, max_pixels, sorted(set(caption_texts))],
        ensure_ascii=False).encode()).hexdigest()[:12]
    stamp = out_dir / STAMP_FILE
    if not overwrite and stamp.exists() and json.loads(stamp.read_text()).get("fingerprint") == fingerprint:
        return out_dir

    tok = train_tiny_tokenizer(caption_texts, spec.tokenizer_vocab_size)
    cfg = tiny_config(tok, spec)
    torch.manual_seed(spec.seed)
    model = Qwen2VLForConditionalGeneration(cfg)
    model.generation_config.eos_token_id = [cfg.text_config.eos_token_id]
    model.generation_config.pad_token_id = cfg.text_config.pad_token_id
    model.generation_config.do_sample = False
    image_processor = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    try:
        from transformers import Qwen2VLVideoProcessor
        video_processor = Qwen2VLVideoProcessor()
    except Exception:  # video processing needs torchvision; captions never use it
        video_processor = None
    processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tok,
                                 video_processor=video_processor, chat_template=QWEN2_VL_CHAT_TEMPLATE)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    atomic_write_json(stamp, {"fingerprint": fingerprint, "spec": architecture(spec),
                              "n_parameters": sum(p.numel() for p in model.parameters())})
    return out_dir


def ensure_tiny_model(params: Any) -> Path:
    """Build the tiny model for ``params`` (its tokenizer learns the jp-shapes captions), pretrained when
    ``model.tiny.pretrain_steps`` > 0; cached, rebuilt only when what it depends on changes."""
    from ..data import all_caption_texts

    texts = all_caption_texts(params.data.root)
    if not texts:
        raise ModelError(f"no jp-shapes captions under {params.data.root}: run 01_data (or "
                         "`jpcap run --only 01`) before building the tiny model")
    m = params.model
    if m.tiny.pretrain_steps > 0:
        return pretrain_tiny_model(tiny_model_dir(params), texts, m.tiny, m.min_pixels, m.max_pixels,
                                   params.data.toy.image_sizes)
    return build_tiny_model(tiny_model_dir(params), texts, m.tiny, m.min_pixels, m.max_pixels)


def tiny_model_dir(params: Any) -> Path:
    """``<model.models_dir>/tiny-qwen2-vl``: where the tiny model is built and loaded from."""
    return Path(params.model.models_dir) / TINY_KEY
