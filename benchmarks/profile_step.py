"""Where a jpcap QLoRA step spends its time and memory (frozen ViT, projector, language model forward,
backward, optimizer), by CUDA events, for one micro-batch size; gradient checkpointing on and off.

    python benchmarks/profile_step.py [--batch 8] [--method qlora]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is a folder of scripts
from bench_train import free, jpcap_model  # noqa: E402
from common import emit, random_model_dir, synthetic_batch  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="qwen2-vl-2b")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--method", default="qlora")
    args = ap.parse_args(argv)
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
