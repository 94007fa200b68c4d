"""Caption speed of the seed's Japanese baselines on the engine (issue 14): LLaVA-JP v1.1 (native port:
SigLIP so400m + S2 + GPT-2 1.3B) and Asagi-2B (transformers' Llava: SigLIP so400m + llm-jp-3-1.8b Llama),
random weights of the real shapes (speed does not depend on weight values), a small stand-in tokenizer
(the prompts' text is ≈ 60 tokens instead of the real ≈ 40; the 728 image tokens dominate), exactly
``--new-tokens`` new tokens per image (random weights never stop early), 640×480-ish COCO-like images.
HF generate on left-padded batches — the engine's path for these families — per batch size.

    python benchmarks/bench_baselines.py --images 256 --batch 1 16 64
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, versions, write_images  # noqa: E402

SIGLIP = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
              image_size=384, patch_size=14)
LM = dict(width=2048, layers=24, heads=16, ffn=7168)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def shrink() -> None:
    """--tiny: the same code on toy widths (a CPU smoke check of this script)."""
    SIGLIP.update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    LM.update(width=64, layers=2, heads=4, ffn=128)


def tokenizer(specials: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from jpcap_helpers.models import REGISTRY
    bpe = Tokenizer(models.BPE(unk_token=specials[0]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    texts = [e.prompt for e in REGISTRY.values()] * 20
    bpe.train_from_iterator(texts, trainer=trainers.BpeTrainer(vocab_size=2000, special_tokens=specials,
                                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token=specials[0], pad_token=specials[0],
                                   eos_token=specials[-1], bos_token=specials[-1])


def llava_jp(dtype):
    from transformers import SiglipImageProcessor, SiglipVisionConfig

    from jpcap_helpers.models.llava_jp_model import LlavaJpForCausalLM, LlavaJpProcessor
    tok = tokenizer(["<unk|LLM-jp>", "<EOD|LLM-jp>"])
    config = dict(model_type="llava-jp", vocab_size=50570, n_positions=2048, n_embd=LM["width"], n_layer=LM["layers"],
                  n_head=LM["heads"], activation_function="gelu", layer_norm_epsilon=1e-5, bos_token_id=1,
                  eos_token_id=1, mm_vision_tower="siglip", mm_hidden_size=2 * SIGLIP["hidden_size"],
                  mm_projector_type="mlp2x_gelu",
                  mm_vision_select_feature="patch", mm_vision_select_layer=-2, scales=[1.0, 0.5])
    vision = SiglipVisionConfig(**SIGLIP)
    with torch.device(DEVICE):
        model = LlavaJpForCausalLM(config, vision).to(dtype).eval()
    processor = LlavaJpProcessor(tok, SiglipImageProcessor(size={"height": 768, "width": 768}), 768, 26 * 28)
    return model, processor


def asagi(dtype):
    from transformers import (
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        SiglipImageProcessor,
        SiglipVisionConfig,
    )
    tok = tokenizer(["<unk>", "<image>", "</s>"])
    image_id = tok.convert_tokens_to_ids("<image>")
    text = LlamaConfig(vocab_size=99584, hidden_size=LM["width"], intermediate_size=LM["ffn"],
                       num_hidden_layers=LM["layers"], num_attention_heads=LM["heads"],
                       num_key_value_heads=LM["heads"], max_position_embeddings=4096)
    config = LlavaConfig(vision_config=SiglipVisionConfig(**SIGLIP), text_config=text, image_token_index=image_id,
                         vision_feature_select_strategy="default", vision_feature_layer=-2)
    with torch.device(DEVICE):
        model = LlavaForConditionalGeneration(config).to(dtype).eval()
    processor = LlavaProcessor(image_processor=SiglipImageProcessor(size={"height": 384, "width": 384}),
                               tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                               image_token="<image>")
    return model, processor


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--models", nargs="+", default=["llava-jp-1.3b", "asagi-2b"])
    ap.add_argument("--tiny", action="store_true", help="toy widths: a CPU smoke check of this script")
    args = ap.parse_args(argv)
    if args.tiny:
        shrink()
    from jpcap_helpers import engine
    from jpcap_helpers.models import REGISTRY, bf16_native

    dtype = (torch.bfloat16 if bf16_native() else torch.float16) if DEVICE == "cuda" else torch.float32
    folder = write_images(Path("/tmp/jpcap-baselines/images"), args.images, "coco")
    records = [{"image_id": i, "file_name": p.name} for i, p in enumerate(sorted(folder.glob("*.jpg")))]
    emit({"bench": "baselines", "versions": versions(), "images": len(records), "new_tokens": args.new_tokens})
    for key in args.models:
        model, processor = (llava_jp if key == "llava-jp-1.3b" else asagi)(dtype)
        model.generation_config.eos_token_id = None  # every caption runs the full --new-tokens
        entry = REGISTRY[key]
        for bs in args.batch:
            n = len(records) if bs > 1 else min(32, len(records))
            out = Path(f"/tmp/jpcap-baselines/{key}-{bs}.jsonl")
            out.unlink(missing_ok=True)
            out.with_suffix(".warm").unlink(missing_ok=True)
            engine.caption_records(model, processor, entry, records[:bs], folder, out.with_suffix(".warm"),
                                   batch_size=bs, max_new_tokens=args.new_tokens, progress=False)
            if DEVICE == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            s = engine.caption_records(model, processor, entry, records[:n], folder, out, batch_size=bs,
                                       max_new_tokens=args.new_tokens, progress=False)
            emit({"bench": "baselines", "model": key, "batch": bs, "images": n, "images_per_s": s["images_per_s"],
                  "wall_s": round(time.perf_counter() - t, 2), "errors": s["n_errors"], "decoder": s["decoder"],
                  "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if DEVICE == "cuda" else None,
                  "params_b": round(sum(p.numel() for p in model.parameters()) / 1e9, 2)})
        del model
        if DEVICE == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
