"""Caption generation throughput: a per-image ``generate`` loop and plain HF batched generate (the
baselines) against the project's caption engine with a LoRA adapter applied — same run, same GPU,
random weights of the real architecture, synthetic 640×480 images, exactly 24 new tokens (greedy; a
random model practically never emits the end token).

    python benchmarks/bench_generate.py [--arch qwen2-vl-2b|qwen2.5-vl-3b|qwen3-vl-2b] [--images 1024] [--batch 64 128 256] [--headline]

``--first-pass`` measures what a one-shot evaluation pays: the engine over ``--images`` files of the
``--mix`` (``coco``: the COCO-like size/orientation mix of ``common.COCO_LIKE_SIZES``), in a fresh process
with an empty inductor cache, twice — the first pass (compilation and graph capture per new shape
included, or up front with ``--warmup``) and a second, warm pass over the same files — with
``--warmup`` / ``--grid-buckets K`` as ``generation.warmup`` / ``generation.grid_buckets``. Run one
setting per process (compiled code stays in the process):

    python benchmarks/bench_generate.py --first-pass --mix coco --images 2048 --batch 256 [--warmup] [--grid-buckets 4]

``--qlora`` compares the ways to caption with a QLoRA adapter (:func:`qlora_ab`):

    python benchmarks/bench_generate.py --qlora --mix coco --images 1024 --batch 64 256
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is a folder of scripts
from common import (  # noqa: E402
    consecutive_vision_runs,
    emit,
    inductor_options,
    random_model_dir,
    synthetic_images,
    versions,
    write_images,
)

ROOT = Path(__file__).resolve().parent.parent
NEW_TOKENS = 24


def make_adapter(model_dir: Path, out: Path) -> Path:
    """A LoRA adapter like the trainer's (r32 on the top 6 layers + projector), saved in PEFT format."""
    if (out / "adapter_config.json").exists():
        return out
    from transformers import AutoModelForImageTextToText

    from jpcap_helpers.params import load_params
    from jpcap_helpers.train import prepare_model

    params = load_params(ROOT / "params/h100.yaml", {"model.name": str(model_dir)}, check_paths=False)
    m = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.bfloat16)
    peft_model = prepare_model(m, params)
    for n, p in peft_model.named_parameters():  # non-zero LoRA B so the adapter really changes outputs
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=1e-3)
    peft_model.save_pretrained(out)
    del m, peft_model
    gc.collect()
    return out


def image_records(n: int, root: Path, files: int = 1024) -> list[dict]:
    """``n`` records over at most ``files`` JPEG files (record i reads file i mod files: every record
    is still read and decoded by the engine)."""
    folder = root / "val2014"
    folder.mkdir(parents=True, exist_ok=True)
    k = min(n, files)
    for i, im in enumerate(synthetic_images(k)):
        name = f"val2014/COCO_val2014_{i:012d}.jpg"
        if not (root / name).exists():
            im.save(root / name, quality=90)
    return [{"image_id": i, "file_name": f"val2014/COCO_val2014_{i % k:012d}.jpg"} for i in range(n)]


def params_for(model_dir: Path, **over):
    from jpcap_helpers.params import load_params
    return load_params(ROOT / "params/h100.yaml", {"model.name": str(model_dir), "model.load_in_4bit": False, **over},
                       check_paths=False)


def hf_generate_rate(model, processor, prompt, images, batch, **gen_kwargs) -> float:
    """Images/s of plain HF generate over ``images`` in batches of ``batch`` (1 = per-image loop)."""
    processor.tokenizer.padding_side = "left"
    torch.cuda.synchronize()
    t = time.perf_counter()
    for i in range(0, len(images), batch):
        chunk = images[i:i + batch]
        inputs = processor(text=[prompt] * len(chunk), images=chunk, return_tensors="pt", padding=True).to("cuda")
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                           **gen_kwargs)
    torch.cuda.synchronize()
    return len(images) / (time.perf_counter() - t)


def engine_rate(model, processor, entry, records, root, bs, decoder, tag, options=None):
    """The engine's summary for ``records`` (``options``: its levers, default EngineOptions())."""
    from jpcap_helpers.engine import EngineOptions, caption_records

    out = Path(f"/tmp/jpcap-bench/pred-{tag}-{bs}.jsonl")
    out.unlink(missing_ok=True)
    torch.cuda.reset_peak_memory_stats()
    return caption_records(model, processor, entry, records, root, out, batch_size=bs, max_new_tokens=NEW_TOKENS,
                           progress=False, decoder=decoder, options=options or EngineOptions())


def stage_times(model, processor, entry, prompt, images, bs, **decoder_options) -> dict:
    """Where a fast-decoder batch spends its time: preprocessing (CPU path, and the engine's GPU path),
    then, from GPU-resident inputs as in the engine, the vision tower, the prefill and decoding."""
    from jpcap_helpers.engine import decode
    from jpcap_helpers.engine.generation import prepare_inputs

    inputs = prepare_inputs(processor, [prompt] * bs, images[:bs])  # warm
    t = time.perf_counter()
    prepare_inputs(processor, [prompt] * bs, images[:bs])
    pre = time.perf_counter() - t
    import numpy as np
    tensors = [torch.from_numpy(np.array(im)).permute(2, 0, 1).contiguous().pin_memory() for im in images[:bs]]
    prepare_inputs(processor, [prompt] * bs, tensors, device="cuda")
    torch.cuda.synchronize()
    t = time.perf_counter()
    inputs = prepare_inputs(processor, [prompt] * bs, tensors, device="cuda")  # as the engine does
    torch.cuda.synchronize()
    pre_gpu = time.perf_counter() - t
    options = {"compile_prefill": bool(getattr(model, "jpcap_compile", False)), **decoder_options}
    dec = decode.GreedyDecoder(model, eos_ids=[], pad_id=0, max_batch=bs, **options)
    dec.generate(inputs, NEW_TOKENS)  # capture (and compile)
    dec.generate(inputs, 1)
    torch.cuda.synchronize()
    t = time.perf_counter()
    dec.generate(inputs, NEW_TOKENS)
    torch.cuda.synchronize()
    total = time.perf_counter() - t
    t = time.perf_counter()
    dec.generate(inputs, 1)  # vision tower + prefill + first token
    torch.cuda.synchronize()
    prefill = time.perf_counter() - t
    base = decode.unwrap(model)
    with torch.no_grad():
        pv = inputs["pixel_values"].to("cuda", base.model.visual.dtype)
        grid = inputs["image_grid_thw"].to("cuda")
        base.model.visual(pv, grid_thw=grid)
        torch.cuda.synchronize()
        t = time.perf_counter()
        base.model.visual(pv, grid_thw=grid)
        torch.cuda.synchronize()
        vit = time.perf_counter() - t
    ms = lambda x: round(1000 * x, 1)  # noqa: E731
    return {"batch": bs, "prefill": dec.prefill, "compiled_prefill": options["compile_prefill"],
            "preprocess_cpu_ms": ms(pre), "preprocess_gpu_ms": ms(pre_gpu), "vit_ms": ms(vit),
            "lm_prefill_ms": ms(prefill - vit), "decode_ms": ms(total - prefill), "gpu_total_ms": ms(total),
            "gpu_only_images_per_s": round(bs / total, 1), "cuda_graphs": dec.cuda_graphs}


def first_pass(args, model_dir: Path, adapter) -> None:
    """The engine's first (cold) and second (warm) pass over one image mix, one setting: rows with
    images/s after any warm-up, the first pass's images/s including its warm-up, warmup_seconds,
    n_grids (distinct visual grids met) and n_resized. With ``--fp8 SCOPE ...``: per scope a second model
    loaded with ``generation.fp8`` (cold pass, then warm), then the bf16 model warm again (A B A: drift
    shows); every row counts the captions equal to the bf16 first pass's."""
    from jpcap_helpers import models

    folder = write_images(Path("/tmp/jpcap-bench") / f"mix-{args.mix}-{args.images}", args.images, args.mix)
    records = [{"image_id": i, "file_name": p.name} for i, p in enumerate(sorted(folder.glob("img_*.jpg")))]
    records = records[:args.images]
    model, processor, entry = models.load_model(params_for(model_dir), adapter=str(adapter) if adapter else None)
    bs = max(args.batch)
    setting = {"mix": args.mix, "batch": bs, "images": len(records), "warmup": args.warmup,
               "grid_buckets": args.grid_buckets, "inductor_options": args.inductor}
    from jpcap_helpers.engine import EngineOptions, caption_records
    from jpcap_helpers.io import read_jsonl
    captions: dict[int, dict] = {}

    def run_pass(m, phase: str, options: EngineOptions, warm_up: bool) -> None:
        k = len(captions)
        out = Path(f"/tmp/jpcap-bench/pred-firstpass-{k}.jsonl")
        out.unlink(missing_ok=True)
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        s = caption_records(m, processor, entry, records, folder, out, batch_size=bs, max_new_tokens=NEW_TOKENS,
                            progress=False, grid_buckets=args.grid_buckets, warmup=warm_up, options=options)
        wall = time.perf_counter() - t
        captions[k] = {r["image_id"]: r["caption"] for r in read_jsonl(out)}
        same = sum(captions[0].get(i) == c for i, c in captions[k].items())
        emit({"bench": "generate-first-pass", "row": phase, **setting, "decoder": s["decoder"],
              "weights": getattr(m, "jpcap_weights", None), "same_captions_as_first_pass": same,
              "images_per_s": s["images_per_s"], "seconds": s["seconds"], "warmup_seconds": s["warmup_seconds"],
              "first_pass_images_per_s": round(s["n_done"] / (s["seconds"] + s["warmup_seconds"]), 2),
              "fill_seconds": s.get("fill_seconds"), "slowest_batches": s.get("slowest_batches"),
              "loader_threads": s.get("loader_threads"), "graph_captures": s.get("graph_captures"),
              "graph_capture_seconds": s.get("graph_capture_seconds"),
              "call_wall_s": round(wall, 2), "n_grids": s["n_grids"], "n_resized": s["n_resized"],
              "canonical_grids": s["canonical_grids"], "n_errors": s["n_errors"],
              "peak_gib": s.get("peak_gpu_gib")})

    def thread_passes(m, label: str) -> None:  # warm passes per loader-thread count, then the default again
        for n in args.loader_threads:
            run_pass(m, f"{label}warm, {n} loader threads", EngineOptions(loader_threads=n), False)
        if args.loader_threads:
            run_pass(m, f"{label}warm again, default loader threads", EngineOptions(), False)

    run_pass(model, "first pass (cold)", EngineOptions(), args.warmup)
    run_pass(model, "second pass (warm)", EngineOptions(), False)
    thread_passes(model, "")
    for lever in args.lever_off:  # warm passes with one lever off, then on again (A B A: drift shows)
        run_pass(model, f"warm, lever off: {lever}", EngineOptions(**{lever: False}), False)
        run_pass(model, f"warm, lever on again: {lever}", EngineOptions(), False)
    for scope in args.fp8:
        m8, _, _ = models.load_model(params_for(model_dir, **{"generation.fp8": scope}),
                                     adapter=str(adapter) if adapter else None)
        run_pass(m8, f"fp8 {scope}: first pass (cold)", EngineOptions(), args.warmup)
        run_pass(m8, f"fp8 {scope}: warm", EngineOptions(), False)
        thread_passes(m8, f"fp8 {scope}: ")
        del m8
        gc.collect()
        torch.cuda.empty_cache()
        run_pass(model, f"bf16 again after fp8 {scope} (warm)", EngineOptions(), False)


def compile_ab(args, model_dir: Path, adapter) -> None:
    """The engine with regional ``torch.compile`` (ViT blocks, prefill layer function) against the same
    engine eager, same run, same files: does compiling pay for this architecture? Also whether both
    wrote the same captions (float reassociation may flip near-ties; the count is reported)."""
    from jpcap_helpers import models
    from jpcap_helpers.io import read_jsonl

    root = Path("/tmp/jpcap-bench/images")
    records = image_records(args.images, root)
    bs = max(args.batch)
    captions, rates = {}, {}
    settings = [("eager", False, False), ("compiled", True, False)]
    if args.vision_runs_baseline:
        settings.insert(1, ("eager, vision attention by consecutive runs (previous plan)", False, True))
    for tag, compiled, previous_plan in settings:
        model, processor, entry = models.load_model(params_for(model_dir, **{"model.compile": compiled}),
                                                    adapter=str(adapter) if adapter else None)
        plan = consecutive_vision_runs() if previous_plan else contextlib.nullcontext()
        with plan:
            t = time.perf_counter()
            engine_rate(model, processor, entry, records[:bs], root, bs, "auto", f"ab-{compiled}{previous_plan}-warm")
            first_s = round(time.perf_counter() - t, 1)
            s = engine_rate(model, processor, entry, records, root, bs, "auto", f"ab-{compiled}{previous_plan}")
        rates[tag] = s["images_per_s"]
        captions[tag] = {r["image_id"]: r["caption"] for r in read_jsonl(Path(s["out_path"]))}
        emit({"bench": "generate-compile-ab", "arch": args.arch, "row": f"engine, {tag}",
              "compiled_blocks": bool(getattr(model, "jpcap_compile", False)), "decoder": s["decoder"],
              "batch": bs, "images": s["n_done"], "images_per_s": s["images_per_s"],
              "first_call_s": first_s, "peak_gib": s.get("peak_gpu_gib")})
        del model
        gc.collect()
        torch.cuda.empty_cache()
    same = sum(captions["eager"].get(i) == c for i, c in captions["compiled"].items())
    emit({"bench": "generate-compile-ab", "arch": args.arch, "speedup_compiled": round(rates["compiled"] / rates["eager"], 3),
          "same_captions": same, "images": len(captions["compiled"])})


def qlora_ab(args, model_dir: Path, adapter: Path) -> None:
    """Captioning with a QLoRA adapter (one trained on a 4-bit base), same run, same files (``--mix``): the
    4-bit base with the adapter kept separate (the previous path: no CUDA graphs, eager prefill), the base
    dequantized with the adapter merged (``generation.merge_qlora_adapter``, the default now), and the bf16
    base with the adapter merged (the rows above) for reference. Per row and batch size: a cold pass
    (compilation, graph capture) and a warm pass; captions compared with the first row's."""
    import shutil

    from jpcap_helpers import models
    from jpcap_helpers.io import read_jsonl

    qlora = adapter.parent / f"{adapter.name}-qlora"
    if not qlora.exists():  # the same LoRA weights, recorded as trained on a 4-bit base
        shutil.copytree(adapter, qlora)
        (qlora / "jpcap_train.json").write_text(json.dumps({"base_model": str(model_dir), "base_load_in_4bit": True}))
    folder = write_images(Path("/tmp/jpcap-bench") / f"mix-{args.mix}-{args.images}", args.images, args.mix)
    records = [{"image_id": i, "file_name": p.name} for i, p in enumerate(sorted(folder.glob("img_*.jpg")))]
    records = records[:args.images]
    rows = [("4-bit base + separate adapter (previous path)", qlora,
             {"model.load_in_4bit": True, "generation.merge_qlora_adapter": False}),
            ("4-bit base dequantized, adapter merged (merge_qlora_adapter, default)", qlora, {"model.load_in_4bit": True}),
            ("bf16 base, adapter merged (reference)", adapter, {})]
    first = {}
    for label, path, over in rows:
        t = time.perf_counter()
        model, processor, entry = models.load_model(params_for(model_dir, **over), adapter=str(path))
        load_s = round(time.perf_counter() - t, 1)
        for bs in args.batch:
            t = time.perf_counter()
            engine_rate(model, processor, entry, records, folder, bs, "auto", f"qlora-cold-{len(first)}")
            cold_s = round(time.perf_counter() - t, 1)
            s = engine_rate(model, processor, entry, records, folder, bs, "auto", f"qlora-warm-{len(first)}")
            caps = {r["image_id"]: r["caption"] for r in read_jsonl(Path(s["out_path"]))}
            ref = first.setdefault(bs, caps)
            emit({"bench": "generate-qlora", "row": label, "weights": model.jpcap_weights, "mix": args.mix,
                  "batch": bs, "images": s["n_done"], "images_per_s": s["images_per_s"], "cold_pass_s": cold_s,
                  "load_s": load_s, "decoder": s["decoder"], "peak_gib": s.get("peak_gpu_gib"),
                  "same_captions_as_first_row": sum(ref.get(i) == c for i, c in caps.items())})
        del model
        gc.collect()
        torch.cuda.empty_cache()


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="qwen2-vl-2b", choices=["qwen2-vl-2b", "qwen2.5-vl-3b", "qwen3-vl-2b"])
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--loop-images", type=int, default=16)
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--skip-baselines", action="store_true")
    ap.add_argument("--headline", action="store_true",
                    help="only the baselines, the default engine (1024 and --images images) and the levers off")
    ap.add_argument("--headline-levers-all", action="store_true", help="levers off on --images images too")
    ap.add_argument("--first-pass", action="store_true",
                    help="only the engine's cold first pass and a warm second pass over --mix (module docstring)")
    ap.add_argument("--compile-ab", action="store_true",
                    help="only the engine compiled vs eager on --images files, same run (with "
                         "--compile-unmeasured for families not in fastpath.COMPILE_MEASURED)")
    ap.add_argument("--vision-runs-baseline", action="store_true",
                    help="--compile-ab: also an eager row with the vision attention's previous plan (consecutive runs)")
    ap.add_argument("--compile-unmeasured", action="store_true",
                    help="allow regional torch.compile for this arch although not yet measured")
    ap.add_argument("--mix", default="coco", choices=["coco", "uniform"], help="--first-pass image sizes")
    ap.add_argument("--warmup", action="store_true", help="generation.warmup in --first-pass (first pass only)")
    ap.add_argument("--lever-off", nargs="*", default=[], choices=["pipeline", "compile_step", "reuse_decoder"],
                    help="--first-pass: after the warm pass, one with this EngineOptions lever off, then on again")
    ap.add_argument("--grid-buckets", type=int, default=0, help="generation.grid_buckets in --first-pass")
    ap.add_argument("--loader-threads", type=int, nargs="*", default=[],
                    help="--first-pass: after each model's warm pass, warm passes with these loader-thread counts")
    ap.add_argument("--fp8", nargs="*", default=[], choices=["language", "all"],
                    help="--first-pass: also a model per generation.fp8 scope (cold, warm), then bf16 warm again")
    ap.add_argument("--inductor", nargs="+", default=[], metavar="KEY=VALUE",
                    help="inductor options for every compile of this process (e.g. coordinate_descent_tuning=True; "
                         "lever probe: compare with a process without)")
    ap.add_argument("--qlora", action="store_true",
                    help="only captioning with a QLoRA adapter: 4-bit + separate adapter vs dequantized + merged")
    args = ap.parse_args(argv)
    args.inductor = inductor_options(args.inductor)
    import torch._inductor.config
    for key, value in args.inductor.items():  # process-wide: the ViT blocks and the decoder's layer functions
        setattr(torch._inductor.config, key, value)
    if args.first_pass:  # a cold process: compiled kernels from an empty inductor cache
        cache = tempfile.mkdtemp(prefix="jpcap-inductor-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"], os.environ["TRITON_CACHE_DIR"] = cache, os.path.join(cache, "triton")
    from jpcap_helpers import engine, models
    from jpcap_helpers.engine import EngineOptions, decode

    emit({"bench": "generate", "versions": versions(), "arch": args.arch, "images": args.images})
    model_dir = random_model_dir(args.arch)
    if args.compile_unmeasured:
        from jpcap_helpers.models import fastpath
        model_type = json.loads((model_dir / "config.json").read_text())["model_type"]
        fastpath.COMPILE_MEASURED = tuple(set(fastpath.COMPILE_MEASURED) | {model_type})
    from jpcap_helpers.train import TrainError
    try:
        adapter = make_adapter(model_dir, Path("/tmp/jpcap-bench") / f"{args.arch}-adapter")
    except TrainError as e:  # an architecture the trainer refuses: captioned zero-shot
        adapter = None
        emit({"bench": "generate", "arch": args.arch, "note": f"no adapter: {e}"})
    with_adapter = "merged adapter" if adapter else "no adapter"
    if args.first_pass:
        first_pass(args, model_dir, adapter)
        return
    if args.compile_ab:
        compile_ab(args, model_dir, adapter)
        return
    if args.qlora:
        qlora_ab(args, model_dir, adapter)
        return
    root = Path("/tmp/jpcap-bench/images")
    records = image_records(args.images, root)
    images = [engine.load_image_for_model(root / r["file_name"]) for r in records[:max(args.batch)]]
    params = params_for(model_dir)

    base_rate = None
    if not args.skip_baselines:  # plain transformers: no compiled blocks
        model, processor, entry = models.load_model(params_for(model_dir, **{"model.compile": False}))
        prompt = engine.build_prompt(entry, processor)
        hf_generate_rate(model, processor, prompt, images[:4], 4)  # warm-up
        torch.cuda.reset_peak_memory_stats()
        base_rate = hf_generate_rate(model, processor, prompt, images[:args.loop_images], 1)
        emit({"bench": "generate", "row": "per-image generate loop (baseline)", "images_per_s": round(base_rate, 2),
              "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)})
        torch.cuda.reset_peak_memory_stats()
        rate = hf_generate_rate(model, processor, prompt, images[:256], 64)
        emit({"bench": "generate", "row": "HF generate, batch 64, no adapter", "images_per_s": round(rate, 2),
              "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
              "ratio_to_loop": round(rate / base_rate, 1)})
        del model
        gc.collect()
        torch.cuda.empty_cache()

    # the engine as users run it: adapter loaded by models.load_model (merged into the bf16 base)
    model, processor, entry = models.load_model(params, adapter=str(adapter) if adapter else None)
    prompt = engine.build_prompt(entry, processor)
    t = time.perf_counter()
    engine_rate(model, processor, entry, records[:64], root, 64, "auto", "warm")
    emit({"bench": "generate", "row": "first engine call, 64 images (torch.compile of the ViT and prefill + graph capture where used)",
          "seconds": round(time.perf_counter() - t, 1)})
    for bs in args.batch:  # later shapes: one dynamic-shape recompile, then none
        engine_rate(model, processor, entry, records[:bs], root, bs, "auto", "warm")
    if args.headline:  # the default engine on many images, and each lever switched off, same run
        bs = max(args.batch)
        few = min(1024, len(records))
        for n in sorted({few, len(records)}):
            s = engine_rate(model, processor, entry, records[:n], root, bs, "auto", "auto")
            emit({"bench": "generate", "row": f"jpcap engine + {with_adapter}, decoder={s['decoder']}", "batch": bs,
                  "images": s["n_done"], "images_per_s": s["images_per_s"], "peak_gib": s.get("peak_gpu_gib"),
                  "n_errors": s["n_errors"], **({"ratio_to_loop": round(s["images_per_s"] / base_rate, 1)}
                                                if base_rate else {})})
        levers = [("pipelining (next batch prepared while this one runs)", EngineOptions(pipeline=False)),
                  ("compiled decoding step", EngineOptions(compile_step=False)),
                  ("compiled prefill layer function (and step, if on)", EngineOptions(compile_prefill=False))]
        if not getattr(model, "jpcap_compile", False):  # nothing compiled for this family: no compile levers
            levers = levers[:1]
        for n in sorted({few, len(records)}):
            for k, (name, options) in enumerate(levers):  # each lever switched off alone
                engine_rate(model, processor, entry, records[:bs], root, bs, "auto", "warm", options)
                s = engine_rate(model, processor, entry, records[:n], root, bs, "auto", f"lever{k}", options)
                emit({"bench": "generate", "row": f"lever off: {name}", "batch": bs,
                      "images": s["n_done"], "images_per_s": s["images_per_s"], "peak_gib": s.get("peak_gpu_gib")})
            if n == few and not args.headline_levers_all:
                break
        return
    fast = decode.supports(model, entry.family)
    for decoder in ("hf", "auto") if fast else ("hf",):
        for bs in (args.batch if decoder == "auto" else [max(args.batch)]):
            s = engine_rate(model, processor, entry, records if decoder == "auto" else records[:512], root, bs,
                            decoder, decoder)
            row = {"bench": "generate", "row": f"jpcap engine + {with_adapter}, decoder={s['decoder']}",
                   "batch": bs, "images": s["n_done"], "images_per_s": s["images_per_s"],
                   "peak_gib": s.get("peak_gpu_gib"), "n_errors": s["n_errors"]}
            if base_rate:
                row["ratio_to_loop"] = round(s["images_per_s"] / base_rate, 1)
            emit(row)
    for bs in (args.batch if fast else []):
        emit({"bench": "generate", "row": f"fast decoder stages ({with_adapter})", **stage_times(
            model, processor, entry, prompt, images, bs)})
    if fast:
        emit({"bench": "generate", "row": "fast decoder stages, prefill through the model's forward (previous default)",
              **stage_times(model, processor, entry, prompt, images, max(args.batch), prefill="model",
                            compile_prefill=False)})
        if getattr(model, "jpcap_compile", False):
            emit({"bench": "generate", "row": "fast decoder stages, compiled decoding step too",
                  **stage_times(model, processor, entry, prompt, images, max(args.batch), compile_step=True)})
    del model
    gc.collect()
    torch.cuda.empty_cache()
    if not adapter:
        return
    # unmerged adapter (what a 4-bit base keeps): the same decoder with LoRA layers in its step
    model, processor, entry = models.load_model(params, adapter=str(adapter), for_training=True)
    model.eval()
    s = engine_rate(model, processor, entry, records[:512], root, max(args.batch), "auto", "unmerged")
    emit({"bench": "generate", "row": f"jpcap engine + unmerged adapter, decoder={s['decoder']}",
          "batch": max(args.batch), "images": s["n_done"], "images_per_s": s["images_per_s"],
          "peak_gib": s.get("peak_gpu_gib")})


if __name__ == "__main__":
    main()
