"""Where a jpcap QLoRA step spends its time and memory (frozen ViT, projector, language model forward,
backward, optimizer), by CUDA events, for one micro-batch size; gradient checkpointing on and off.
``--kernels``: instead, the step as ``bench_train.py`` times it (compiled, positions in the batch, bf16
autocast) under the CUDA profiler: GPU time by kernel kind (GEMM, attention, fused Triton, other
element-wise, optimizer, copies), the GPU's idle share of the step's wall time, and the top kernels.

    python benchmarks/profile_step.py [--batch 8] [--method qlora] [--kernels]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is a folder of scripts
from bench_train import fast, free, jpcap_model  # noqa: E402
from common import emit, inductor_options, random_model_dir, synthetic_batch  # noqa: E402

# kernel kinds by name (first match wins); names differ between cuBLAS/cuDNN/torch versions
KINDS = (("gemm", ("gemm", "nvjet", "cutlass", "sm90_xmma", "xmma_", "splitk", "Kernel2", "triton_tem")),
         ("triton (fused by inductor)", ("triton",)),
         ("attention", ("flash", "fmha", "cudnn", "attn", "sdpa")),
         ("optimizer", ("multi_tensor", "foreach", "adam")),
         ("copy", ("memcpy", "memset", "copy", "cat", "fill")),
         ("other", ("",)))


def kind_of(name: str) -> str:
    low = name.lower()
    return next(kind for kind, keys in KINDS if any(k.lower() in low for k in keys))


def kernel_profile(args) -> None:
    """GPU time of ``args.steps`` compiled training steps by kernel kind, the idle share, the top kernels."""
    import time

    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from jpcap_helpers.train.positions import rope_positions

    model, params = jpcap_model(random_model_dir(args.arch), "params/h100.yaml", args.method)
    batch, _ = synthetic_batch(args.arch, args.batch, params.model.max_pixels)
    batch["position_ids"] = rope_positions(batch["input_ids"], batch["mm_token_type_ids"], batch["image_grid_thw"],
                                           merge_size=2, attention_mask=batch["attention_mask"])
    batch = {k: v.cuda() for k, v in batch.items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fast(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):  # compilation and autotuning happen here
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
        wall_ms = 1000 * (time.perf_counter() - t) / args.steps
    by_kind: dict[str, float] = {}
    by_name: dict[str, float] = {}
    for e in prof.events():
        if e.device_type != DeviceType.CUDA:
            continue
        ms = e.time_range.elapsed_us() / 1000 / args.steps
        by_kind[kind_of(e.name)] = by_kind.get(kind_of(e.name), 0.0) + ms
        by_name[e.name] = by_name.get(e.name, 0.0) + ms
    busy = sum(by_kind.values())
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:args.top]
    emit({"bench": "profile-kernels", "method": args.method, "micro_batch": args.batch,
          "inductor_options": inductor_options(args.inductor), "step_wall_ms": round(wall_ms, 1),
          "gpu_busy_ms": round(busy, 1), "idle_share": round(1 - busy / wall_ms, 3),
          "by_kind_ms": {k: round(v, 1) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
          "top_kernels_ms": [[name[:90], kind_of(name), round(ms, 2)] for name, ms in top]})


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="qwen2-vl-2b")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--method", default="qlora")
    ap.add_argument("--kernels", action="store_true", help="kernel-kind profile of the compiled step (docstring)")
    ap.add_argument("--steps", type=int, default=2, help="--kernels: profiled steps")
    ap.add_argument("--top", type=int, default=25, help="--kernels: kernels listed")
    ap.add_argument("--inductor", nargs="+", default=[], metavar="KEY=VALUE",
                    help="--kernels: inductor options for the compiled blocks (process-wide)")
    args = ap.parse_args(argv)
    if args.kernels:
        import torch._inductor.config
        for key, value in inductor_options(args.inductor).items():
            setattr(torch._inductor.config, key, value)
        kernel_profile(args)
        return
    from jpcap_helpers.train import causal_lm, language_forward, visual_features

    path = random_model_dir(args.arch)
    for gc_on in (False, True):
        model, params = jpcap_model(path, "params/h100.yaml", args.method, {"train.gradient_checkpointing": gc_on})
        batch, _ = synthetic_batch(args.arch, args.batch, params.model.max_pixels)
        batch = {k: v.cuda() for k, v in batch.items()}
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        base = causal_lm(model)
        marks = {}
        for it in range(5):
            free() if it == 4 else None
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(5)]
            ev[0].record()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                embeds, sizes, deepstack = visual_features(base, batch["pixel_values"], batch["image_grid_thw"])
                ev[1].record()
                mem_vit = torch.cuda.max_memory_allocated()
                out = language_forward(base, batch, embeds, sizes, deepstack=deepstack)
                hidden = out.last_hidden_state[:, :-1]
                targets = batch["labels"][:, 1:]
                sel = targets != -100
                loss = torch.nn.functional.cross_entropy(base.lm_head(hidden[sel]).float(), targets[sel])
            ev[2].record()
            mem_fwd = torch.cuda.max_memory_allocated()
            loss.backward()
            ev[3].record()
            opt.step()
            opt.zero_grad(set_to_none=True)
            ev[4].record()
            torch.cuda.synchronize()
            if it >= 2:
                for name, (a, b) in {"vit_ms": (0, 1), "llm_fwd_ms": (1, 2), "backward_ms": (2, 3), "optim_ms": (3, 4)}.items():
                    marks.setdefault(name, []).append(ev[a].elapsed_time(ev[b]))
        emit({"bench": "profile", "method": args.method, "micro_batch": args.batch, "gradient_checkpointing": gc_on,
              **{k: round(sorted(v)[len(v) // 2], 1) for k, v in marks.items()},
              "peak_after_vit_gib": round(mem_vit / 2**30, 2), "peak_after_fwd_gib": round(mem_fwd / 2**30, 2),
              "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)})
        del model, opt
        free()


if __name__ == "__main__":
    main()
