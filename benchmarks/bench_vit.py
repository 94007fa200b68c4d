"""The frozen vision tower alone — the largest share of a caption batch's GPU time (≈ 62%) and of a
training step's — as jpcap loads it (linear patch embedding, batched attention), random weights of the
real shape, 640×480 images at ``max_pixels`` 448² (936 patches each): eager, compiled as jpcap
compiles it (``fastpath.compile_blocks``), and compiled with a ``torch.compile`` mode (lever probe, e.g.
``max-autotune-no-cudagraphs``: Triton GEMM templates with fused epilogues, autotuned). Per row:
ms per image, TFLOP/s, first-call seconds (compilation/autotuning), the largest difference of the
merged features from the eager row, and the kernels' time by kind (GEMM, attention, other).

    python benchmarks/bench_vit.py [--batch 128] [--modes max-autotune-no-cudagraphs] [--sdpa FLASH_ATTENTION ...]
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is a folder of scripts
from common import emit, peak_tflops, random_model_dir, synthetic_batch, versions  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
KINDS = (("attention", ("flash", "fmha", "attention", "cudnn")),
         ("gemm", ("gemm", "sm90", "nvjet", "cutlass", "triton_tem", "mm_", "_mm")))


def vision_tower(model_dir: Path):
    """The ViT as ``models.load_model`` prepares it for inference, not compiled (bf16, on the GPU)."""
    from jpcap_helpers import models
    from jpcap_helpers.params import load_params

    params = load_params(ROOT / "params/h100.yaml", {"model.name": str(model_dir), "model.load_in_4bit": False,
                                                      "model.compile": False}, check_paths=False)
    model, _, _ = models.load_model(params)
    model.eval()
    return model.model.visual, params


def vit_flops(visual, grid_thw) -> float:
    """Forward FLOPs: 2·params·patches for the blocks' and merger's matmuls + 4·dim·n² per block
    (scores and weighted sum) for each image's attention."""
    blocks = sum(p.numel() for p in visual.blocks.parameters() if p.dim() == 2)
    merger = sum(p.numel() for p in visual.merger.parameters() if p.dim() == 2)
    dim = visual.blocks[0].attn.qkv.in_features
    total = 0.0
    for t, h, w in grid_thw.tolist():
        n = t * h * w
        total += 2 * blocks * n + 2 * merger * n / 4 + 4 * dim * n * n * len(visual.blocks)
    return total


def merged_features(visual, pixels, grid, backend: str | None = None):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    forced = sdpa_kernel(getattr(SDPBackend, backend)) if backend else contextlib.nullcontext()
    with torch.no_grad(), forced:
        return visual(pixels, grid_thw=grid).pooler_output


def kernel_split(fn) -> dict:
    """GPU milliseconds of one call by kernel kind (names matched as in KINDS)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    split: dict[str, float] = {}
    top: dict[str, float] = {}
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name = ev.name.lower()
        kind = next((k for k, keys in KINDS if any(s in name for s in keys)), "other")
        ms = ev.time_range.elapsed_us() / 1000
        split[kind] = split.get(kind, 0.0) + ms
        top[ev.name[:70]] = top.get(ev.name[:70], 0.0) + ms
    return {"kernel_ms": {k: round(v, 1) for k, v in sorted(split.items())},
            "top_kernels_ms": {k: round(v, 1) for k, v in sorted(top.items(), key=lambda kv: -kv[1])[:8]}}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="qwen2-vl-2b")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--modes", nargs="*", default=["max-autotune-no-cudagraphs"],
                    help="torch.compile modes tried for the vision blocks besides jpcap's default")
    ap.add_argument("--sdpa", nargs="*", default=[], choices=["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"],
                    help="extra rows: jpcap's compiled tower with the attention forced to this SDPA backend")
    ap.add_argument("--cold-cache", action="store_true", help="an empty inductor cache (first-call seconds as a new host)")
    args = ap.parse_args(argv)
    if args.cold_cache:
        cache = tempfile.mkdtemp(prefix="jpcap-inductor-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"], os.environ["TRITON_CACHE_DIR"] = cache, os.path.join(cache, "triton")
    from jpcap_helpers.models.fastpath import compile_blocks

    emit({"bench": "vit", "versions": versions(), "arch": args.arch, "batch": args.batch})
    model_dir = random_model_dir(args.arch)
    reference = None
    rows = ["eager", "compiled (jpcap default)", *args.modes, *(f"compiled, sdpa {b}" for b in args.sdpa)]
    for row in rows:
        visual, params = vision_tower(model_dir)
        if row != "eager":
            compile_blocks(visual.blocks, **({} if row.startswith("compiled") else {"mode": row}))
        backend = row.split("sdpa ")[1] if "sdpa " in row else None
        batch, n_img = synthetic_batch(args.arch, args.batch, params.model.max_pixels, model_dir=model_dir)
        pixels = batch["pixel_values"].to("cuda", visual.dtype)
        grid = batch["image_grid_thw"].to("cuda")
        call = functools.partial(merged_features, visual, pixels, grid, backend)

        torch.cuda.synchronize()
        t = time.perf_counter()
        out = call()
        torch.cuda.synchronize()
        first_s = time.perf_counter() - t
        call()
        times = []
        for _ in range(args.steps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        sec = sorted(times)[len(times) // 2]
        out = out.float()
        if reference is None:
            reference = out
        diff = (out - reference).abs().max().item()
        emit({"bench": "vit", "row": row, "batch": args.batch, "image_tokens": n_img,
              "ms_per_image": round(1000 * sec / args.batch, 3), "images_per_s": round(args.batch / sec, 1),
              "tflops": round(vit_flops(visual, grid) / sec / 1e12, 1),
              "mfu": round(vit_flops(visual, grid) / sec / 1e12 / peak_tflops(), 3),
              "first_call_s": round(first_s, 1), "max_abs_diff_vs_eager": round(diff, 5),
              "ref_abs_max": round(reference.abs().max().item(), 3), **kernel_split(call)})
        del visual, out, call
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
