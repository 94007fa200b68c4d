"""Caption packing (``train.pack_captions``) against one (image, caption) pair per row: training
throughput in captions/s and peak memory, same run, same synthetic data (640×480 images, a 20-token
prompt, 5 captions per image of 15–30 tokens, COCO-like), fast path with random weights of the real shape.

    python benchmarks/bench_pack.py [--arch qwen2-vl-2b|qwen2.5-vl-3b|qwen3-vl-2b] [--recipes t4,h100] [--steps 6]
    python benchmarks/bench_pack.py --tiny          # CPU smoke check: a tiny random model, fp32, LoRA

Recipes: ``t4`` = params/colab_t4.yaml (fp16 autocast, 4-bit, gradient checkpointing, no compile) and
``h100`` = params/h100.yaml defaults (bf16 autocast, 4-bit, regional compile on GPUs of compute
capability ≥ 8.0). Rows per recipe: unpacked at the recipe's micro-batch (pairs), packed with the same
number of images per micro-batch (5× the captions), and packed with about as many captions per micro-batch
as the unpacked row. Prints one JSON line per measurement (and appends to $BENCH_OUT).
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is a folder of scripts
from common import ARCHS, CONFIGS, emit, processor_for, random_model_dir, special_ids, synthetic_images, versions  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CAPTIONS_PER_IMAGE = 5
CAPTION_TOKENS = (15, 30)
PROMPT_TOKENS = 20
RECIPES = {"t4": ("params/colab_t4.yaml", {"model.precision": "fp16", "model.compile": False}, torch.float16),
           "h100": ("params/h100.yaml", {}, torch.bfloat16)}


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def tiny_model_dir(root: str | Path = "/tmp/jpcap-bench") -> Path:
    """A small random Qwen2-VL (2 text layers of width 64, 2 ViT blocks) with the real vocabulary size."""
    from transformers import AutoModelForImageTextToText, Qwen2VLConfig

    out = Path(root) / "qwen2-vl-tiny-pack-v1"
    if (out / "config.json").exists():
        return out
    processor = processor_for("qwen2-vl-2b")
    ids = {k: v for k, v in special_ids(processor.tokenizer).items() if k != "im_start"}
    text = dict(CONFIGS[ARCHS["qwen2-vl-2b"]]["text"], hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=128)
    text.pop("mrope_section")
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": text.pop("rope_theta"), "mrope_section": [2, 3, 3]}
    vision = dict(CONFIGS[ARCHS["qwen2-vl-2b"]]["vision"], depth=2, embed_dim=64, num_heads=4, hidden_size=64,
                  in_channels=3)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(
        Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids), dtype=torch.float32)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def load(path: Path, recipe: str, tiny: bool):
    """Model (fast-path patches + LoRA, as the trainer builds it), params and autocast dtype of a recipe."""
    from jpcap_helpers import models
    from jpcap_helpers.params import load_params
    from jpcap_helpers.train import prepare_model

    params_file, over, dtype = RECIPES[recipe]
    over = {**over, "model.name": str(path)}
    if tiny:   # CPU: fp32, no 4-bit
        over.update({"model.precision": "fp32", "model.load_in_4bit": False, "model.compile": False,
                     "train.top_k_layers": "all"})
        dtype = None
    params = load_params(ROOT / params_file, over, check_paths=False)
    model, _, _ = models.load_model(params, load_in_4bit=params.model.load_in_4bit, for_training=True)
    model = prepare_model(model, params)
    if not params.model.load_in_4bit:
        model.to(device())
    return model, params, dtype


def synthetic_data(n_images: int, max_pixels: int, model_dir: Path, arch: str = "qwen2-vl-2b", seed: int = 0) -> dict:
    """Image patches and token ids: per image a prefix (chat + image tokens + prompt + assistant header)
    and 5 captions of 15–30 tokens, each ending with ``<|im_end|>``."""
    import json

    from transformers import Qwen2VLImageProcessor

    ip = Qwen2VLImageProcessor(patch_size=CONFIGS[ARCHS[arch]]["vision"].get("patch_size", 14))  # Qwen3-VL: 16
    out = ip(images=synthetic_images(n_images, seed=seed), return_tensors="pt",
             size={"shortest_edge": 56 * 56, "longest_edge": max_pixels})
    thw = out["image_grid_thw"]
    n_img = int(thw[0].prod()) // 4
    cfg = json.loads((model_dir / "config.json").read_text())
    ids = special_ids(processor_for(arch).tokenizer)
    g = torch.Generator().manual_seed(seed)
    prefixes, captions = [], []
    for _ in range(n_images):
        p = torch.randint(1000, 150000, (PROMPT_TOKENS,), generator=g).tolist()
        prefixes.append([ids["im_start"]] + p[:3] + [cfg["vision_start_token_id"]] + [cfg["image_token_id"]] * n_img
                        + [cfg["vision_end_token_id"]] + p[3:] + [ids["eos_token_id"], ids["im_start"]])
        lengths = torch.randint(CAPTION_TOKENS[0], CAPTION_TOKENS[1] + 1, (CAPTIONS_PER_IMAGE,), generator=g).tolist()
        captions.append([torch.randint(1000, 150000, (n,), generator=g).tolist() + [ids["eos_token_id"]]
                         for n in lengths])
    per_image = int(thw[0].prod())
    return {"pixels": out["pixel_values"].view(n_images, per_image, -1), "thw": thw, "prefixes": prefixes,
            "captions": captions, "image_token_id": cfg["image_token_id"], "n_image_tokens": n_img}


def unpacked_batch(data: dict, n_pairs: int) -> dict:
    """``n_pairs`` (image, caption) rows, image-major (the image repeated for each of its captions)."""
    pairs = [(i, c) for i in range(len(data["prefixes"])) for c in data["captions"][i]][:n_pairs]
    rows = [data["prefixes"][i] + c for i, c in pairs]
    length = max(map(len, rows))
    ids = torch.tensor([r + [0] * (length - len(r)) for r in rows])
    labels = torch.tensor([[-100] * len(data["prefixes"][i]) + c + [-100] * (length - len(r))
                           for (i, c), r in zip(pairs, rows)])
    mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows])
    images = [i for i, _ in pairs]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "pixel_values": data["pixels"][images].flatten(0, 1), "image_grid_thw": data["thw"][images],
            "mm_token_type_ids": (ids == data["image_token_id"]).int()}


def packed_batch(data: dict, n_images: int) -> dict:
    """``n_images`` packed rows, each with all its captions (the trainer's layout)."""
    from jpcap_helpers.train.packing import pack_token_rows

    prefixes = data["prefixes"][:n_images]
    types = [[int(t == data["image_token_id"]) for t in p] for p in prefixes]
    batch = pack_token_rows(prefixes, types, data["captions"][:n_images], 0)
    batch["mm_token_type_ids"] = batch["mm_token_type_ids"].int()
    batch.update(pixel_values=data["pixels"][:n_images].flatten(0, 1), image_grid_thw=data["thw"][:n_images])
    return batch


def timed(step_fn, steps: int, warmup: int = 2) -> float:
    times = []
    for i in range(warmup + steps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        step_fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(row: dict, model, batch: dict, dtype, steps: int) -> dict | None:
    from jpcap_helpers.train import caption_loss
    from jpcap_helpers.train.packing import target_count

    batch = {k: v.to(device()) for k, v in batch.items()}
    captions = int(batch["n_captions"]) if "n_captions" in batch else int(batch["input_ids"].shape[0])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    free()

    def step():
        with torch.autocast(device(), dtype=dtype, enabled=dtype is not None):
            total, n = caption_loss(model, batch)
        (total / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step.loss = float(total.detach() / n)

    try:
        sec = timed(step, steps)
    except torch.OutOfMemoryError:
        opt = None
        free()
        emit({**row, "error": "OOM"})
        return None
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    out = {**row, "captions": captions, "target_tokens": target_count(batch), "tokens": int(batch["input_ids"].numel()),
           "seq": int(batch["input_ids"].shape[1]), "step_s": round(sec, 4), "captions_per_s": round(captions / sec, 2),
           "peak_gib": round(peak, 2) if peak is not None else None, "loss": round(step.loss, 3)}
    emit(out)
    opt = None
    free()
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="qwen2-vl-2b", choices=list(ARCHS))
    ap.add_argument("--recipes", default="t4,h100")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--unpacked-scale", type=int, nargs="+", default=[1],
                    help="unpacked rows at these multiples of the recipe's micro-batch (memory-matched comparisons)")
    ap.add_argument("--packed-scale", type=float, nargs="+", default=[1],
                    help="packed rows at these multiples of the recipe's micro-batch of images")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke check on a tiny random model")
    args = ap.parse_args(argv)
    if torch.cuda.is_available():   # several shapes per run: keep every row compiled (h100 recipe)
        torch._dynamo.config.recompile_limit = 64
    steps = 2 if args.tiny else args.steps
    emit({"bench": "pack", "versions": versions(), "arch": "tiny" if args.tiny else args.arch})
    path = tiny_model_dir() if args.tiny else random_model_dir(args.arch)
    for recipe in args.recipes.split(","):
        model, params, dtype = load(path, recipe, args.tiny)
        m = params.train.micro_batch_size
        n_images = max(m, max(round(m * s) for s in args.packed_scale))
        data = synthetic_data(n_images, params.model.max_pixels, path, "qwen2-vl-2b" if args.tiny else args.arch)
        base = {"bench": "pack", "recipe": recipe, "micro_batch_size": m,
                "gradient_checkpointing": params.train.gradient_checkpointing, "compile": params.model.compile,
                "image_tokens": data["n_image_tokens"]}
        rows = {"unpacked": measure({**base, "layout": "unpacked", "images": m}, model, unpacked_batch(data, m),
                                    dtype, steps),
                "packed_same_images": measure({**base, "layout": "packed", "images": m}, model, packed_batch(data, m),
                                              dtype, steps)}
        measured = list(rows.values())
        for scale in (s for s in args.unpacked_scale if s != 1):   # rows of one pair each: m*s pairs of m images
            measured.append(measure({**base, "layout": "unpacked", "images": m * scale}, model,
                                    unpacked_batch(data, m * scale), dtype, steps))
        for scale in (s for s in args.packed_scale if s != 1):
            measured.append(measure({**base, "layout": "packed", "images": round(m * scale)}, model,
                                    packed_batch(data, round(m * scale)), dtype, steps))
        k = max(1, round(m / CAPTIONS_PER_IMAGE))
        rows["packed_same_captions"] = measure({**base, "layout": "packed", "images": k}, model,
                                               packed_batch(data, k), dtype, steps)
        ref = rows["unpacked"]
        for name, r in rows.items():
            if ref and r and name != "unpacked":
                emit({"bench": "pack", "recipe": recipe, "ratio": name, "images": r["images"],
                      "speedup_captions_per_s": round(r["captions_per_s"] / ref["captions_per_s"], 2),
                      "memory_ratio": round(r["peak_gib"] / ref["peak_gib"], 3) if ref["peak_gib"] else None})
        for line in equal_memory(r for r in measured + [rows["packed_same_captions"]] if r):
            emit({"bench": "pack", "recipe": recipe, **line})
        del model
        free()


def equal_memory(rows) -> list[dict]:
    """For each packed row: the fastest unpacked row that needs no more peak memory, and the ratio of their
    captions/s (the memory-matched comparison; none where every unpacked row needs more memory)."""
    rows = list(rows)
    unpacked = [r for r in rows if r["layout"] == "unpacked"]
    out = []
    for p in (r for r in rows if r["layout"] == "packed"):
        fits = [u for u in unpacked if u["peak_gib"] is not None and u["peak_gib"] <= p["peak_gib"]]
        if fits:
            best = max(fits, key=lambda u: u["captions_per_s"])
            out.append({"equal_memory": f"packed {p['images']} images vs unpacked {best['captions']} pairs",
                        "packed_peak_gib": p["peak_gib"], "unpacked_peak_gib": best["peak_gib"],
                        "speedup_captions_per_s": round(p["captions_per_s"] / best["captions_per_s"], 2)})
    return out


if __name__ == "__main__":
    main()
