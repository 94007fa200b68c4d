"""Where one caption batch spends GPU time (random weights of the real architecture, synthetic
640×480 images): GPU preprocessing (wall vs kernel time), the vision tower, three language-model
prefills (the model's forward, the decoder's own layer function eager and compiled), the decoding
steps, SDPA backends for the ViT's attention shape, and how busy the GPU is during an engine run.

    python benchmarks/profile_generate.py [--arch qwen2-vl-2b] [--batch 256] [--engine-images 512]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is a folder of scripts
from bench_generate import NEW_TOKENS, image_records, params_for  # noqa: E402
from common import emit, random_model_dir, synthetic_images, versions, write_images  # noqa: E402


def wall_ms(fn, reps: int = 3, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return round(1000 * (time.perf_counter() - t) / reps, 1)


def kernel_ms(fn, table: str | None = None, rows: int = 12) -> float:
    """Sum of GPU kernel and copy durations of one call (the GPU's busy time), optionally printing the
    top kernels."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    busy = sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA)
    if table:
        print(f"--- top GPU kernels: {table}")
        try:
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=70))
        except Exception as e:  # column names differ between torch versions
            print("table unavailable:", e)
    return round(busy / 1000, 1)


def engine_timeline(run, min_gap_ms: float = 1.0) -> dict:
    """Run ``run()`` (an engine call) under a CUDA-only profiler (little host overhead) and report the
    GPU's busy time, and its idle gaps: before the first kernel, between kernels, after the last."""
    import gc

    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    pauses: list[float] = []  # Python garbage-collector pauses during the run (a suspect for idle gaps)
    started: dict = {}

    def on_gc(phase, info):
        if phase == "start":
            started["t"] = time.perf_counter()
        elif "t" in started:
            pauses.append(1000 * (time.perf_counter() - started.pop("t")))

    torch.cuda.synchronize()
    gc.callbacks.append(on_gc)
    t0 = time.perf_counter()
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            summary = run()
            torch.cuda.synchronize()
            wall_ms = 1000 * (time.perf_counter() - t0)
    finally:
        gc.callbacks.remove(on_gc)
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == DeviceType.CUDA)
    busy, gaps, end = 0.0, [], None
    for a, b in spans:  # merge overlapping kernels (several streams)
        if end is None or a > end:
            if end is not None:
                gaps.append((a - end) / 1000)
            busy += (b - a) / 1000
            end = b
        elif b > end:
            busy += (b - end) / 1000
            end = b
    span_ms = (spans[-1][1] - spans[0][0]) / 1000 if spans else 0.0
    big = sorted((g for g in gaps if g >= min_gap_ms), reverse=True)
    return {"images": summary["n_done"], "images_per_s": summary["images_per_s"], "wall_ms": round(wall_ms, 1),
            "gpu_busy_ms": round(busy, 1), "first_to_last_kernel_ms": round(span_ms, 1),
            "outside_kernel_span_ms": round(wall_ms - span_ms, 1),
            f"gaps_ge_{min_gap_ms:g}ms": len(big), "gaps_ge_sum_ms": round(sum(big), 1),
            "small_gaps_sum_ms": round(sum(gaps) - sum(big), 1), "largest_gaps_ms": [round(g, 1) for g in big[:12]],
            "engine_seconds": summary["seconds"], "gc_pauses": len(pauses), "gc_pause_ms": round(sum(pauses), 1),
            "largest_gc_pauses_ms": [round(x, 1) for x in sorted(pauses, reverse=True)[:6]]}


class HostTimeline:
    """Times the driving thread's host work in an engine run (monkeypatched wrappers, no GPU sync):
    writing rows (fsync), preparing a batch (waiting for its JPEG loads, then the processor), the work
    done while the GPU is busy, and a batch's captioning call. Long intervals that are not covered by
    queued GPU work show up as the GPU's idle gaps."""

    def __init__(self):
        from jpcap_helpers.engine import pipeline

        self.pipeline, self.spans, self.saved = pipeline, [], []

    def _wrap(self, owner, name: str, label: str) -> None:
        fn = getattr(owner, name)
        spans = self.spans

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spans.append((label, t, time.perf_counter()))
        self.saved.append((owner, name, fn))
        setattr(owner, name, timed)

    def __enter__(self):
        p = self.pipeline
        self._wrap(p.RowWriter, "emit", "write rows (fsync)")
        self._wrap(p.BatchCaptioner, "prepare", "prepare batch (load wait + processor)")
        self._wrap(p, "prepare_inputs", "processor (tokenise + GPU preprocessing)")
        self._wrap(p.BatchPipeline, "_between", "work while the GPU is busy")
        self._wrap(p, "generate_batch", "caption one batch (GPU queue + decode + text)")
        return self

    def __exit__(self, *exc):
        for owner, name, fn in reversed(self.saved):
            setattr(owner, name, fn)

    def summary(self, top: int = 12) -> dict:
        by: dict = {}
        for label, a, b in self.spans:
            d = by.setdefault(label, {"n": 0, "sum_ms": 0.0, "max_ms": 0.0})
            d["n"] += 1
            d["sum_ms"] += 1000 * (b - a)
            d["max_ms"] = max(d["max_ms"], 1000 * (b - a))
        longest = sorted(self.spans, key=lambda s: s[1] - s[2])[:top]
        t0 = min((a for _, a, _ in self.spans), default=0.0)
        return {"host": {k: {kk: round(vv, 1) for kk, vv in v.items()} for k, v in by.items()},
                "longest_host_spans": [(label, round(1000 * (a - t0), 1), round(1000 * (b - a), 1))
                                       for label, a, b in longest]}


class Labels:
    """Labels the engine's host steps as profiler ranges (``record_function``), so that a CPU+CUDA profile
    says which step the driving thread was in during each of the GPU's idle gaps (:func:`gap_causes`)."""

    STEPS = [("pipeline", "RowWriter.emit", "write rows"), ("pipeline", "BatchCaptioner.prepare", "prepare batch"),
             ("pipeline", "prepare_inputs", "processor"), ("pipeline", "BatchPipeline._between", "while busy"),
             ("pipeline", "generate_batch", "caption batch"),
             ("decode", "GreedyDecoder._check_batch", "check batch"),
             ("decode", "GreedyDecoder._prompt_embeddings", "vision tower + embeddings"),
             ("decode", "GreedyDecoder._ensure_capacity", "kv capacity"), ("decode", "GreedyDecoder._graph", "graph"),
             ("decode", "GreedyDecoder._own_prefill", "prefill")]

    def __init__(self):
        from jpcap_helpers.engine import decode, pipeline

        self.modules, self.saved = {"pipeline": pipeline, "decode": decode}, []

    def __enter__(self):
        from torch.profiler import record_function

        for mod, dotted, label in self.STEPS:
            owner = self.modules[mod]
            *outer, name = dotted.split(".")
            for part in outer:
                owner = getattr(owner, part)
            fn = getattr(owner, name)

            def labelled(*a, _fn=fn, _label=label, **k):
                with record_function(f"## {_label}"):
                    return _fn(*a, **k)
            self.saved.append((owner, name, fn))
            setattr(owner, name, labelled)
        return self

    def __exit__(self, *exc):
        for owner, name, fn in reversed(self.saved):
            setattr(owner, name, fn)


def gap_causes(run, min_gap_ms: float = 40.0, top: int = 6) -> dict:
    """Run ``run()`` under a CPU+CUDA profiler with the engine's steps labelled (:class:`Labels`) and,
    for each GPU idle gap of at least ``min_gap_ms``, say what the host threads did meanwhile: the
    driving thread's innermost event covering the gap's middle (with its chain of enclosing ranges) and
    the events overlapping the gap most, on the driving thread and on the others."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with Labels(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        summary = run()
        torch.cuda.synchronize()
    t = time.perf_counter()
    events = list(prof.events())
    gpu = sorted((e.time_range.start, e.time_range.end) for e in events if e.device_type == DeviceType.CUDA)
    gaps, end = [], None
    for a, b in gpu:
        if end is not None and a - end >= 1000 * min_gap_ms:
            gaps.append((end, a))
        end = b if end is None else max(end, b)
    cpu = [e for e in events if e.device_type == DeviceType.CPU]
    main = next((e.thread for e in cpu if e.name == "## caption batch"), None)

    def overlap(e, a, b) -> float:
        return max(0.0, min(e.time_range.end, b) - max(e.time_range.start, a)) / 1000

    def chain(e) -> list[str]:
        names = []
        while e is not None:
            names.append(f"{e.name} ({e.time_range.elapsed_us() / 1000:.1f} ms)")
            e = e.cpu_parent
        return names[::-1]

    out = []
    for a, b in sorted(gaps, key=lambda g: g[0] - g[1])[:12]:
        mid = (a + b) / 2
        covering = [e for e in cpu if e.thread == main and e.time_range.start <= mid <= e.time_range.end]
        inner = max(covering, key=lambda e: e.time_range.start, default=None)
        mine = sorted((e for e in cpu if e.thread == main and not e.name.startswith("## ")),
                      key=lambda e: -overlap(e, a, b))
        others = sorted((e for e in cpu if e.thread != main), key=lambda e: -overlap(e, a, b))
        out.append({"gap_ms": round((b - a) / 1000, 1), "at_ms": round((a - gpu[0][0]) / 1000, 1),
                    "driving_thread_at_middle": chain(inner) if inner is not None else [],
                    "driving_thread_top": [(e.name, round(overlap(e, a, b), 1)) for e in mine[:top] if overlap(e, a, b) > 0],
                    "other_threads_top": [(e.name, e.thread, round(overlap(e, a, b), 1))
                                          for e in others[:top] if overlap(e, a, b) > 0]})
    return {"images": summary["n_done"], "images_per_s_under_profiler": summary["images_per_s"],
            "n_cpu_events": len(cpu), "analysis_s": round(time.perf_counter() - t, 1), "gaps": out}


def sdpa_backends(shape, dtype=torch.bfloat16) -> dict:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    n, h, length, d = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(n, length, h, d, device="cuda", dtype=dtype, generator=g).transpose(1, 2) for _ in range(3))
    out, ref = {}, None
    for name in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
        backend = getattr(SDPBackend, name, None)
        if backend is None:
            continue
        try:
            with sdpa_kernel([backend]):
                o = F.scaled_dot_product_attention(q, k, v)
                ms = wall_ms(lambda: F.scaled_dot_product_attention(q, k, v), reps=5)
            ref = o if ref is None else ref
            out[name] = {"ms": ms, "max_abs_diff_vs_first": round(float((o.float() - ref.float()).abs().max()), 4)}
        except Exception as e:
            out[name] = {"error": str(e)[:160]}
    flops = 4 * n * h * length * length * d
    for v_ in out.values():
        if "ms" in v_:
            v_["tflops"] = round(flops / (v_["ms"] / 1000) / 1e12, 1)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="qwen2-vl-2b")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--engine-images", type=int, default=512)
    ap.add_argument("--engine-only", action="store_true",
                    help="only the engine's GPU timeline (busy time and idle gaps) on --engine-images files")
    ap.add_argument("--gap-causes", action="store_true",
                    help="with --engine-only: a CPU+CUDA profile of one warm run; for each long GPU idle gap, "
                         "what the host threads were doing (gap_causes)")
    ap.add_argument("--mix", default="uniform", choices=["coco", "uniform"], help="--engine-only image sizes")
    ap.add_argument("--grid-buckets", type=int, default=0, help="--engine-only: generation.grid_buckets")
    ap.add_argument("--repeat", type=int, default=1,
                    help="with --engine-only: profile the whole run this many times in one process (a later "
                         "run finds the pinned host blocks and the allocator's cache warm: do the long pauses stay?)")
    args = ap.parse_args(argv)
    from jpcap_helpers import engine, models
    from jpcap_helpers.engine import decode
    from jpcap_helpers.engine.generation import prepare_inputs

    bs = args.batch
    emit({"bench": "profile_generate", "versions": versions(), "arch": args.arch, "batch": bs})
    model_dir = random_model_dir(args.arch)
    model, processor, entry = models.load_model(params_for(model_dir))
    prompt = engine.build_prompt(entry, processor)
    if args.engine_only:
        if args.mix == "coco":
            root = write_images(Path("/tmp/jpcap-bench") / f"mix-coco-{args.engine_images}", args.engine_images)
            records = [{"image_id": i, "file_name": p.name} for i, p in enumerate(sorted(root.glob("img_*.jpg")))]
        else:
            root = Path("/tmp/jpcap-bench/images")
            records = image_records(args.engine_images, root)
        out = Path("/tmp/jpcap-bench/profile-engine.jsonl")

        def run(n=len(records), warm=False):
            out.unlink(missing_ok=True)
            return engine.caption_records(model, processor, entry, records[:n], root, out, batch_size=bs,
                                          max_new_tokens=NEW_TOKENS, progress=False, warmup=warm,
                                          grid_buckets=args.grid_buckets)
        run(warm=True)  # compilation and graph capture for every shape of the run, then a whole run
        if args.gap_causes:
            emit({"bench": "profile_generate", "stage": "gap causes (CPU+CUDA profiler, labelled host steps)",
                  "batch": bs, "mix": args.mix, "grid_buckets": args.grid_buckets, **gap_causes(run)})
        for i in range(args.repeat):
            emit({"bench": "profile_generate", "stage": "engine timeline (CUDA-only profiler)", "batch": bs,
                  "repeat": i + 1, **engine_timeline(run)})
        with HostTimeline() as host:   # the driving thread's host work, to set against the GPU's gaps
            timeline = engine_timeline(run)
        emit({"bench": "profile_generate", "stage": "engine timeline + host spans", "batch": bs,
              **timeline, **host.summary()})
        return
    import numpy as np
    tensors = [torch.from_numpy(np.array(im)).permute(2, 0, 1).contiguous().pin_memory()
               for im in synthetic_images(bs)]
    prep = lambda: prepare_inputs(processor, [prompt] * bs, tensors, device="cuda")  # noqa: E731
    inputs = prep()
    row = {"bench": "profile_generate", "stage": "preprocess on GPU", "wall_ms": wall_ms(prep),
           "gpu_busy_ms": kernel_ms(prep, "preprocess")}
    row["where"] = {k: str(v.device) for k, v in inputs.items() if torch.is_tensor(v)}
    emit(row)

    dec = decode.GreedyDecoder(model, eos_ids=[], pad_id=0, max_batch=bs)
    kwargs = {k: (v.to("cuda") if torch.is_tensor(v) else v) for k, v in inputs.items() if k != "attention_mask"}
    kwargs["pixel_values"] = kwargs["pixel_values"].to(dec.inner.visual.dtype)
    ids, grid, mm = kwargs["input_ids"], kwargs["image_grid_thw"], kwargs.get("mm_token_type_ids")
    length = ids.shape[1]
    pos1, _ = dec.inner.get_rope_index(input_ids=ids[:1].cpu(), mm_token_type_ids=None if mm is None else mm[:1].cpu(),
                                       image_grid_thw=grid[:1].cpu(), attention_mask=None)
    position_ids = pos1.to("cuda").expand(3, bs, length)

    with torch.no_grad():
        vit = lambda: dec.inner.visual(kwargs["pixel_values"], grid_thw=kwargs["image_grid_thw"])  # noqa: E731
        emit({"bench": "profile_generate", "stage": "vision tower (compiled blocks)", "tokens": length,
              "patches_per_image": int(grid[0].prod()), "wall_ms": wall_ms(vit), "gpu_busy_ms": kernel_ms(vit, "ViT")})
        ids_cpu, grid_cpu = inputs["input_ids"].cpu(), inputs["image_grid_thw"].cpu()
        embeds = dec._prompt_embeddings(kwargs, ids_cpu, grid_cpu)
        emb = lambda: dec._prompt_embeddings(kwargs, ids_cpu, grid_cpu)  # noqa: E731
        emit({"bench": "profile_generate", "stage": "ViT + projector + embedding scatter", "wall_ms": wall_ms(emb)})

        hf = lambda: dec.lm(inputs_embeds=embeds, position_ids=position_ids, use_cache=True)  # noqa: E731
        emit({"bench": "profile_generate", "stage": "LM prefill, model forward (eager, HF cache)",
              "attn_implementation": dec.lm.config._attn_implementation,
              "wall_ms": wall_ms(hf), "gpu_busy_ms": kernel_ms(hf, "LM prefill (HF forward)")})
        attn0 = dec.lm.layers[0].self_attn
        dec._ensure_capacity(length, NEW_TOKENS, embeds.dtype, attn0.k_proj.out_features // attn0.head_dim,
                             attn0.head_dim)
        own = lambda: dec._own_prefill(embeds, position_ids)  # noqa: E731
        emit({"bench": "profile_generate", "stage": "LM prefill, own layer function (eager)",
              "wall_ms": wall_ms(own), "gpu_busy_ms": kernel_ms(own)})
        compiled = decode.GreedyDecoder(model, eos_ids=[], pad_id=0, max_batch=bs, compile_prefill=True)
        compiled._ensure_capacity(length, NEW_TOKENS, embeds.dtype, attn0.k_proj.out_features // attn0.head_dim,
                                  attn0.head_dim)
        own_compiled = lambda: compiled._own_prefill(embeds, position_ids)  # noqa: E731
        t = time.perf_counter()
        own_compiled()
        torch.cuda.synchronize()
        compile_s = round(time.perf_counter() - t, 1)
        emit({"bench": "profile_generate", "stage": "LM prefill, own layer function (compiled)",
              "first_call_s": compile_s, "wall_ms": wall_ms(own_compiled),
              "gpu_busy_ms": kernel_ms(own_compiled, "LM prefill (own, compiled)")})
        compiled = own_compiled = None  # free its buffers

    for mode in ("model", "own"):
        d = decode.GreedyDecoder(model, eos_ids=[], pad_id=0, max_batch=bs, prefill=mode, compile_prefill=mode == "own")
        full = lambda d=d: d.generate(inputs, NEW_TOKENS)  # noqa: E731
        first = lambda d=d: d.generate(inputs, 1)  # noqa: E731
        full()
        w_full, w_first = wall_ms(full), wall_ms(first)
        emit({"bench": "profile_generate", "stage": f"GreedyDecoder.generate, prefill={mode}",
              "total_ms": w_full, "prefill_incl_vit_ms": w_first, "decode_ms": round(w_full - w_first, 1),
              "gpu_busy_ms": kernel_ms(full), "gpu_only_images_per_s": round(bs / (w_full / 1000), 1)})
        d = full = first = None  # free its buffers before the next one

    head_dim = dec.inner.visual.config.hidden_size // dec.inner.visual.config.num_heads
    emit({"bench": "profile_generate", "stage": "SDPA backends, ViT attention shape",
          "shape": [bs, dec.inner.visual.config.num_heads, int(grid[0].prod()), head_dim],
          "backends": sdpa_backends((bs, dec.inner.visual.config.num_heads, int(grid[0].prod()), head_dim))})

    if args.engine_images:
        root = Path("/tmp/jpcap-bench/images")
        records = image_records(args.engine_images, root)
        out = Path("/tmp/jpcap-bench/profile-engine.jsonl")

        def run():
            out.unlink(missing_ok=True)
            return engine.caption_records(model, processor, entry, records, root, out, batch_size=bs,
                                          max_new_tokens=NEW_TOKENS, progress=False)
        run()
        t = time.perf_counter()
        s = run()
        wall = time.perf_counter() - t
        busy = kernel_ms(run)
        emit({"bench": "profile_generate", "stage": "engine run", "images": s["n_done"],
              "images_per_s": s["images_per_s"], "wall_ms": round(1000 * wall, 1),
              "gpu_busy_ms_under_profiler": busy, "decoder": s["decoder"]})


if __name__ == "__main__":
    main()
